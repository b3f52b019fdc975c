// Cut cross-entropy (Wijmans et al.): the loss of z = e · cᵀ + bias (then softcap · tanh(z /
// softcap)) for e [N, D], c [V, D] without ever writing z. CCE_T is the input type: __half or
// __nv_bfloat16 (mma.sync m16n8k16, fp32 accumulate) or float (the same tiles with FMA in full
// fp32, as torch's matmul without TF32). Launch plans: python/ferrograd/ops/cce/cuda.py.
//
// Tiles: a block of 4 warps (2 x 2) owns 64 rows of e x 128 vocabulary entries; each warp a 32 x
// 64 piece held as 2 x 8 m16n8 accumulator fragments (the FMA path keeps the same fragment
// layout, so one epilogue serves every type). e and c stream through a 3-stage cp.async ring
// of 64-byte row slices (rows padded to 80 bytes: ldmatrix reads without bank conflicts).
//
// cce_forward: block = (row tile, vocabulary split); it walks its vocabulary tiles with one
// pipeline running across tile boundaries and folds each finished tile into a running (max,
// Σ exp(z - max)) per row, plus the target logit and Σ z. Per (split, row) it writes the
// partial (max, sum, Σ z); the caller merges the splits.
//
// cce_backward: block = one (row tile, vocabulary tile), ordered in groups of 32 row tiles so
// that the blocks in flight share e and c in L2. It recomputes the tile, forms dz in registers,
// drops the whole tile when the filter allows it (before the two gradient GEMMs, two thirds of
// the work), else stores dz · grad_scale rounded to CCE_T in shared memory and walks D in
// 128-byte slices: dE[rows] += dz · c[slice], dC[vocab] += dzᵀ · e[slice], both fp32 atomics into
// scratch. The vocabulary may be visited through a permutation `order` (sorted by mean logit, so
// that filtered tiles cluster). grad_scale is a power of two that puts max |dz| at 2^14: dz then
// stays out of fp16's subnormal range.
//
// Requirements (checked by the caller): D · sizeof(CCE_T) % 16 == 0 and 16-byte aligned rows.

#include "common.cuh"

#ifndef CCE_T
#error "compile with -DCCE_T=float, __half or __nv_bfloat16"
#endif

using namespace fg;
using T = CCE_T;

namespace {

constexpr int kThreads = 128;
constexpr int kBM = 64;   // rows of e per block
constexpr int kBN = 128;  // vocabulary entries per block
constexpr int kStages = 3;
constexpr int kSlice = 64;                  // bytes of a row per pipeline stage
constexpr int kSliceStride = kSlice + 16;   // padded shared-memory row
constexpr int kSliceK = kSlice / sizeof(T);  // k per stage
constexpr int kStageBytes = (kBM + kBN) * kSliceStride;
constexpr int kChunk = 128;  // bytes of D per step of the backward's gradient GEMMs
constexpr int kChunkStride = kChunk + 16;
constexpr int kChunkD = kChunk / sizeof(T);
constexpr int kChunkBytes = (kBM + kBN) * kChunkStride;
constexpr int kDzStride = kBN * sizeof(T) + 16;
constexpr int kDzBytes = kBM * kDzStride;
constexpr int kGroupRows = 32;  // row tiles per group of the backward's block order

constexpr int kForwardSmem = kStages * kStageBytes;
constexpr int kBackwardSmem = kStages * kStageBytes > kDzBytes + 2 * kChunkBytes
                                  ? kStages * kStageBytes
                                  : kDzBytes + 2 * kChunkBytes;
static_assert(kForwardSmem == 46080, "keep ops/cce/cuda.py FORWARD_SMEM in sync");
static_assert(kBackwardSmem == (sizeof(T) == 4 ? 89088 : 72704),
              "keep ops/cce/cuda.py BACKWARD_SMEM in sync");

// Start of row `row` of e, or nullptr past the end.
__device__ __forceinline__ const char* e_row(const T* e, i64 row, int n, int d) {
    return row < n ? reinterpret_cast<const char*>(e + row * d) : nullptr;
}

// Column (vocabulary entry) at position pos of the visiting order, or -1 past the end.
__device__ __forceinline__ i64 vocab_col(const i32* order, i64 pos, int v) {
    return pos < v ? (order != nullptr ? order[pos] : pos) : -1;
}

__device__ __forceinline__ const char* c_row(const T* c, const i32* order, i64 pos, int v,
                                             int d) {
    const i64 col = vocab_col(order, pos, v);
    return col >= 0 ? reinterpret_cast<const char*>(c + col * d) : nullptr;
}

// cp.async of ROWS rows x BYTES bytes (from byte offset byte0 of each source row, zeros past
// row_bytes or for a null row) into shared memory rows of STRIDE bytes.
template <int ROWS, int BYTES, int STRIDE, class RowFn>
__device__ __forceinline__ void copy_rows(char* dst, RowFn row, i64 byte0, i64 row_bytes,
                                          const void* any_valid) {
    constexpr int kChunks = BYTES / 16;
    static_assert(ROWS * kChunks % kThreads == 0, "whole copies per thread");
#pragma unroll
    for (int it = 0; it < ROWS * kChunks / kThreads; ++it) {
        const int i = it * kThreads + threadIdx.x;
        const int r = i / kChunks;
        const int q = i % kChunks;
        const char* src = row(r);
        const i64 offset = byte0 + q * 16;
        const bool ok = src != nullptr && offset < row_bytes;
        cp_async_16(dst + r * STRIDE + q * 16, ok ? src + offset : any_valid, ok ? 16 : 0);
    }
}

// acc[MI][NI] (m16n8 fragments) += A · B over K for one warp, operands in shared memory.
// A(m, k) is at a + m * a_stride + k * sizeof(T) (A_MMAJOR: at a + k * a_stride + m * sizeof(T));
// B(k, n) at b + n * b_stride + k * sizeof(T) (B_NMAJOR: at b + k * b_stride + n * sizeof(T)).
template <int MI, int NI, int K, bool A_MMAJOR, bool B_NMAJOR>
__device__ __forceinline__ void warp_gemm(float (&acc)[MI][NI][4], const char* a, int a_stride,
                                          const char* b, int b_stride) {
    const int lane = threadIdx.x & 31;
    if constexpr (is_f32<T>::value) {
        const int g = lane >> 2;
        const int t = lane & 3;
#pragma unroll 4
        for (int k = 0; k < K; ++k) {
            float av[MI][2], bv[NI][2];
#pragma unroll
            for (int i = 0; i < MI * 2; ++i) {
                const int m = (i >> 1) * 16 + (i & 1) * 8 + g;
                av[i >> 1][i & 1] = *reinterpret_cast<const float*>(
                    A_MMAJOR ? a + k * a_stride + m * 4 : a + m * a_stride + k * 4);
            }
#pragma unroll
            for (int i = 0; i < NI * 2; ++i) {
                const int n = (i >> 1) * 8 + 2 * t + (i & 1);
                bv[i >> 1][i & 1] = *reinterpret_cast<const float*>(
                    B_NMAJOR ? b + k * b_stride + n * 4 : b + n * b_stride + k * 4);
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        acc[mi][ni][i] = fmaf(av[mi][i >> 1], bv[ni][i & 1], acc[mi][ni][i]);
                    }
                }
            }
        }
    } else {
        static_assert(K % 16 == 0 && NI % 2 == 0, "whole m16n8k16 steps, n8 tiles in pairs");
        const int q = lane >> 3;  // the 8x8 matrix this lane addresses a row of
        const int r = lane & 7;
#pragma unroll 2
        for (int k0 = 0; k0 < K; k0 += 16) {
            u32 af[MI][4], bf[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                // Matrices: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15).
                const int m = mi * 16 + (q & 1) * 8;
                const int k = k0 + (q >> 1) * 8;
                if constexpr (A_MMAJOR) {
                    ldmatrix_x4_trans(af[mi], a + (k + r) * a_stride + m * 2);
                } else {
                    ldmatrix_x4(af[mi], a + (m + r) * a_stride + k * 2);
                }
            }
#pragma unroll
            for (int ni = 0; ni < NI; ni += 2) {
                // Matrices: (n tile ni, k 0-7), (ni, k 8-15), (ni + 1, k 0-7), (ni + 1, k 8-15).
                const int n = (ni + (q >> 1)) * 8;
                const int k = k0 + (q & 1) * 8;
                u32 x[4];
                if constexpr (B_NMAJOR) {
                    ldmatrix_x4_trans(x, b + (k + r) * b_stride + n * 2);
                } else {
                    ldmatrix_x4(x, b + (n + r) * b_stride + k * 2);
                }
                bf[ni][0] = x[0];
                bf[ni][1] = x[1];
                bf[ni + 1][0] = x[2];
                bf[ni + 1][1] = x[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) mma_16816(acc[mi][ni], af[mi], bf[ni], T());
            }
        }
    }
}

// The warp's 32 x 64 piece of the (64-row, 128-entry) logit tile of pipeline steps step ..
// step + k_steps - 1 (one per k slice), through the stage ring; load_stage(s) issues step s.
// The caller issued steps 0 .. kStages - 2 before the first call.
constexpr int kMI = 2;
constexpr int kNI = 8;

template <class LoadStage>
__device__ __forceinline__ void tile_logits(float (&acc)[kMI][kNI][4], const char* smem,
                                            int step, int k_steps, LoadStage load_stage) {
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;
    for (int s = step; s < step + k_steps; ++s) {
        cp_async_wait<kStages - 2>();  // step s has landed (for this thread) ...
        __syncthreads();               // ... for every thread, and step s - 1 is consumed
        load_stage(s + kStages - 1);   // into the buffer step s - 1 used
        const char* buf = smem + (s % kStages) * kStageBytes;
        warp_gemm<kMI, kNI, kSliceK, false, false>(
            acc, buf + (warp >> 1) * 32 * kSliceStride, kSliceStride,
            buf + (kBM + (warp & 1) * 64) * kSliceStride, kSliceStride);
    }
}

// Issues (or, past the last step, skips) the cp.async of pipeline step s = (tile, k slice)
// and commits a group either way, so that group counts stay uniform.
struct StageLoader {
    const T* e;
    const T* c;
    const i32* order;
    i64 row0;
    int n, v, d;
    int k_steps, steps;
    int first_tile;  // vocabulary tile of step 0
    char* smem;

    __device__ __forceinline__ void operator()(int s) const {
        if (s < steps) {
            char* buf = smem + (s % kStages) * kStageBytes;
            const i64 byte0 = static_cast<i64>(s % k_steps) * kSlice;
            const i64 row_bytes = static_cast<i64>(d) * sizeof(T);
            const i64 vpos0 = static_cast<i64>(first_tile + s / k_steps) * kBN;
            copy_rows<kBM, kSlice, kSliceStride>(
                buf, [&](int r) { return e_row(e, row0 + r, n, d); }, byte0, row_bytes, e);
            copy_rows<kBN, kSlice, kSliceStride>(
                buf + kBM * kSliceStride, [&](int r) { return c_row(c, order, vpos0 + r, v, d); },
                byte0, row_bytes, c);
        }
        cp_async_commit();
    }
};

__device__ __forceinline__ float apply_softcap(float z, float softcap) {
    return softcap > 0.f ? softcap * tanhf(z / softcap) : z;
}

// Merges the running (max, sum) of `other` into (max, sum).
__device__ __forceinline__ void merge_lse(float& max, float& sum, float other_max,
                                          float other_sum) {
    const float m = fmaxf(max, other_max);
    sum = m == FG_NEG_INF ? 0.f : sum * expf(max - m) + other_sum * expf(other_max - m);
    max = m;
}

}  // namespace

// Grid: row tiles x splits blocks (split fastest). part_* are [splits, n]; part_zsum may be
// null; z_target (zeroed by the caller) receives z[i, targets[i]] for targets in [0, v).
extern "C" __global__ void __launch_bounds__(kThreads)
cce_forward(const T* __restrict__ e, const T* __restrict__ c, const T* __restrict__ bias,
            const i64* __restrict__ targets, float* __restrict__ part_max,
            float* __restrict__ part_sum, float* __restrict__ part_zsum,
            float* __restrict__ z_target, int n, int v, int d, int splits, int tiles_per_split,
            float softcap) {
    extern __shared__ __align__(16) char smem[];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int split = blockIdx.x % splits;
    const i64 row0 = static_cast<i64>(blockIdx.x / splits) * kBM;
    const int tiles = (v + kBN - 1) / kBN;
    const int first_tile = split * tiles_per_split;
    const int k_steps = (d * static_cast<int>(sizeof(T)) + kSlice - 1) / kSlice;
    const int steps = (min(tiles, first_tile + tiles_per_split) - first_tile) * k_steps;
    const StageLoader load_stage{e, c, nullptr, row0, n, v, d, k_steps, steps, first_tile, smem};

    // Per lane: rows wm * 32 + mi * 16 + h * 8 + g, columns wn * 64 + ni * 8 + 2t + j.
    float run_max[kMI][2], run_sum[kMI][2], zsum[kMI][2];
    i64 target[kMI][2];
#pragma unroll
    for (int i = 0; i < kMI * 2; ++i) {
        const i64 row = row0 + (warp >> 1) * 32 + i * 8 + g;
        run_max[i >> 1][i & 1] = FG_NEG_INF;
        run_sum[i >> 1][i & 1] = 0.f;
        zsum[i >> 1][i & 1] = 0.f;
        target[i >> 1][i & 1] = row < n ? targets[row] : -1;
    }

    for (int s = 0; s < kStages - 1; ++s) load_stage(s);
    for (int step = 0; step < steps; step += k_steps) {
        float acc[kMI][kNI][4];
        tile_logits(acc, smem, step, k_steps, load_stage);

        const i64 col0 = static_cast<i64>(first_tile + step / k_steps) * kBN + (warp & 1) * 64;
        float col_bias[kNI][2];
        u32 in_vocab = 0;  // bit 2 ni + j: column ni * 8 + 2t + j is < v
#pragma unroll
        for (int i = 0; i < kNI * 2; ++i) {
            const i64 col = col0 + (i >> 1) * 8 + 2 * t + (i & 1);
            in_vocab |= static_cast<u32>(col < v) << i;
            col_bias[i >> 1][i & 1] = col < v && bias != nullptr ? to_float(bias[col]) : 0.f;
        }
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                // Logits of this row (-inf past the vocabulary), their max and sum.
                float tile_max = FG_NEG_INF;
#pragma unroll
                for (int ni = 0; ni < kNI; ++ni) {
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        float& z = acc[mi][ni][2 * h + j];
                        if (!(in_vocab >> (2 * ni + j) & 1u)) {
                            z = FG_NEG_INF;
                            continue;
                        }
                        z = apply_softcap(z + col_bias[ni][j], softcap);
                        zsum[mi][h] += z;
                        tile_max = fmaxf(tile_max, z);
                        if (col0 + ni * 8 + 2 * t + j == target[mi][h]) {
                            z_target[row0 + (warp >> 1) * 32 + mi * 16 + h * 8 + g] = z;
                        }
                    }
                }
                const float m = fmaxf(run_max[mi][h], tile_max);
                if (m == FG_NEG_INF) continue;
                float sum = 0.f;
#pragma unroll
                for (int ni = 0; ni < kNI; ++ni) {
                    sum += expf(acc[mi][ni][2 * h] - m) + expf(acc[mi][ni][2 * h + 1] - m);
                }
                run_sum[mi][h] = run_sum[mi][h] * expf(run_max[mi][h] - m) + sum;
                run_max[mi][h] = m;
            }
        }
    }

    // Merge the four lanes of a group, then the two warps of a row (through shared memory).
#pragma unroll
    for (int i = 0; i < kMI * 2; ++i) {
        float& max = run_max[i >> 1][i & 1];
        float& sum = run_sum[i >> 1][i & 1];
#pragma unroll
        for (int offset = 1; offset < 4; offset <<= 1) {
            merge_lse(max, sum, __shfl_xor_sync(0xffffffffu, max, offset),
                      __shfl_xor_sync(0xffffffffu, sum, offset));
        }
        zsum[i >> 1][i & 1] = sum_xor<1, 2>(zsum[i >> 1][i & 1]);
    }
    cp_async_wait<0>();
    __syncthreads();  // the stage ring is free
    float* red = reinterpret_cast<float*>(smem);  // [2 warp columns][kBM rows][max, sum, zsum]
    if (t == 0) {
#pragma unroll
        for (int i = 0; i < kMI * 2; ++i) {
            float* slot = red + ((warp & 1) * kBM + (warp >> 1) * 32 + i * 8 + g) * 3;
            slot[0] = run_max[i >> 1][i & 1];
            slot[1] = run_sum[i >> 1][i & 1];
            slot[2] = zsum[i >> 1][i & 1];
        }
    }
    __syncthreads();
    const i64 row = row0 + threadIdx.x;
    if (threadIdx.x < kBM && row < n) {
        const float* a = red + threadIdx.x * 3;
        const float* b = red + (kBM + threadIdx.x) * 3;
        float max = a[0], sum = a[1];
        merge_lse(max, sum, b[0], b[1]);
        const i64 out = static_cast<i64>(split) * n + row;
        part_max[out] = max;
        part_sum[out] = sum;
        if (part_zsum != nullptr) part_zsum[out] = a[2] + b[2];
    }
}

// Grid: row tiles x vocabulary tiles blocks, in groups of kGroupRows row tiles (row fastest
// within a group). coef_* and lse are fp32 [n]; order (int32 [v]) may be null (identity);
// de [n, d], dc [v, d] and dbias [v] (may be null) are zeroed fp32 scratch. A tile is dropped
// when each of its |cs_i p_ij| is below filter_eps * max(|cs_i|, |ct_i|) (the reference's rule,
// ops/cce/reference.py); filter_eps < 0 turns the filter off; grad_scale points at the power of
// two described above.
extern "C" __global__ void __launch_bounds__(kThreads)
cce_backward(const T* __restrict__ e, const T* __restrict__ c, const T* __restrict__ bias,
             const i64* __restrict__ targets, const float* __restrict__ lse,
             const float* __restrict__ coef_softmax, const float* __restrict__ coef_target,
             const float* __restrict__ coef_uniform, const i32* __restrict__ order,
             float* __restrict__ de, float* __restrict__ dc, float* __restrict__ dbias, int n,
             int v, int d, int row_tiles, float softcap, float filter_eps,
             const float* __restrict__ grad_scale) {
    extern __shared__ __align__(16) char smem[];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int wm = warp >> 1;
    const int wn = warp & 1;
    const int g = lane >> 2;
    const int t = lane & 3;

    const int vocab_tiles = (v + kBN - 1) / kBN;
    const int per_group = kGroupRows * vocab_tiles;
    const int first_row_tile = static_cast<int>(blockIdx.x) / per_group * kGroupRows;
    const int group_rows = min(kGroupRows, row_tiles - first_row_tile);
    const int in_group = static_cast<int>(blockIdx.x) % per_group;
    const i64 row0 = static_cast<i64>(first_row_tile + in_group % group_rows) * kBM;
    const int vocab_tile = in_group / group_rows;
    const i64 vpos0 = static_cast<i64>(vocab_tile) * kBN;

    const int k_steps = (d * static_cast<int>(sizeof(T)) + kSlice - 1) / kSlice;
    const StageLoader load_stage{e, c, order, row0, n, v, d, k_steps, k_steps, vocab_tile, smem};
    for (int s = 0; s < kStages - 1; ++s) load_stage(s);
    float acc[kMI][kNI][4];
    tile_logits(acc, smem, 0, k_steps, load_stage);

    // dz in place of the logits; keep: whether this thread needs the tile's gradient GEMMs.
    float cs[kMI][2], ct[kMI][2], cu[kMI][2], row_lse[kMI][2];
    i64 target[kMI][2];
#pragma unroll
    for (int i = 0; i < kMI * 2; ++i) {
        const i64 row = row0 + wm * 32 + i * 8 + g;
        const bool valid = row < n;
        cs[i >> 1][i & 1] = valid ? coef_softmax[row] : 0.f;
        ct[i >> 1][i & 1] = valid ? coef_target[row] : 0.f;
        cu[i >> 1][i & 1] = valid ? coef_uniform[row] : 0.f;
        row_lse[i >> 1][i & 1] = valid ? lse[row] : 0.f;
        target[i >> 1][i & 1] = valid ? targets[row] : -1;
    }
    bool keep = !(filter_eps >= 0.f);
#pragma unroll
    for (int ni = 0; ni < kNI; ++ni) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const i64 col = vocab_col(order, vpos0 + wn * 64 + ni * 8 + 2 * t + j, v);
            const float b = col >= 0 && bias != nullptr ? to_float(bias[col]) : 0.f;
#pragma unroll
            for (int i = 0; i < kMI * 2; ++i) {
                const int mi = i >> 1, h = i & 1;
                float& z = acc[mi][ni][2 * h + j];
                if (col < 0 || row0 + wm * 32 + i * 8 + g >= n) {
                    z = 0.f;
                    continue;
                }
                z = apply_softcap(z + b, softcap);
                // cs = 0 (ignored rows) never multiplies a stray exp(z - lse) = inf.
                const float sp = cs[mi][h] != 0.f ? cs[mi][h] * expf(z - row_lse[mi][h]) : 0.f;
                const bool hit = col == target[mi][h];
                float grad = sp - (hit ? ct[mi][h] : 0.f) - cu[mi][h];
                // The filter is relative to the row's gradient scale max(|cs|, |ct|); rows
                // without a gradient (ignored: all coefficients 0) never keep a tile; a NaN
                // coefficient makes sp NaN, which keeps it.
                const bool has_grad = cs[mi][h] != 0.f || ct[mi][h] != 0.f || cu[mi][h] != 0.f;
                const float threshold = filter_eps * fmaxf(fabsf(cs[mi][h]), fabsf(ct[mi][h]));
                keep |= has_grad && (!(fabsf(sp) < threshold) || hit || cu[mi][h] != 0.f);
                if (softcap > 0.f) {
                    const float capped = z / softcap;
                    grad *= 1.f - capped * capped;
                }
                z = grad;
            }
        }
    }
    cp_async_wait<0>();
    if (!__syncthreads_or(keep)) return;  // also: every warp is done with the stage ring

    const float scale = *grad_scale;
    char* dz = smem;
#pragma unroll
    for (int ni = 0; ni < kNI; ++ni) {
        if (dbias != nullptr) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                // Column sums over the warp's 32 rows: own 4 values, then the 8 groups.
                float sum = 0.f;
#pragma unroll
                for (int i = 0; i < kMI * 2; ++i) sum += acc[i >> 1][ni][2 * (i & 1) + j];
                sum = sum_xor<4, 16>(sum);
                const i64 col = vocab_col(order, vpos0 + wn * 64 + ni * 8 + 2 * t + j, v);
                if (g == 0 && col >= 0) atomicAdd(dbias + col, sum);
            }
        }
#pragma unroll
        for (int i = 0; i < kMI * 2; ++i) {
            const int mi = i >> 1, h = i & 1;
            T* p = reinterpret_cast<T*>(dz + (wm * 32 + i * 8 + g) * kDzStride) + wn * 64 +
                   ni * 8 + 2 * t;
            store2(p, acc[mi][ni][2 * h] * scale, acc[mi][ni][2 * h + 1] * scale);
        }
    }

    // Gradient GEMMs over D in kChunkD slices, double-buffered after dz.
    const float unscale = 1.f / scale;
    const i64 row_bytes = static_cast<i64>(d) * sizeof(T);
    const int chunks = (d + kChunkD - 1) / kChunkD;
    auto load_chunk = [&](int ch) {
        char* buf = smem + kDzBytes + (ch & 1) * kChunkBytes;  // c rows, then e rows
        const i64 byte0 = static_cast<i64>(ch) * kChunk;
        copy_rows<kBN, kChunk, kChunkStride>(
            buf, [&](int r) { return c_row(c, order, vpos0 + r, v, d); }, byte0, row_bytes, c);
        copy_rows<kBM, kChunk, kChunkStride>(
            buf + kBN * kChunkStride, [&](int r) { return e_row(e, row0 + r, n, d); }, byte0,
            row_bytes, e);
    };
    load_chunk(0);
    cp_async_commit();
    constexpr int kNI2 = kChunkD / 2 / 8;  // n8 tiles of a warp's half of the slice
    for (int ch = 0; ch < chunks; ++ch) {
        if (ch + 1 < chunks) load_chunk(ch + 1);
        cp_async_commit();
        cp_async_wait<1>();  // slice ch has landed (for this thread) ...
        __syncthreads();     // ... for every thread (and dz is visible)
        const char* cbuf = smem + kDzBytes + (ch & 1) * kChunkBytes;
        const char* ebuf = cbuf + kBN * kChunkStride;
        const int dcol0 = ch * kChunkD + wn * (kChunkD / 2);
        const int ncol = wn * (kChunkD / 2) * static_cast<int>(sizeof(T));
        {
            // dE[64 rows, slice] += dz [64, 128] · c[128, slice]; warp: 32 rows x half the slice.
            float acc_e[2][kNI2][4] = {};
            warp_gemm<2, kNI2, kBN, false, true>(acc_e, dz + wm * 32 * kDzStride, kDzStride,
                                                 cbuf + ncol, kChunkStride);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const i64 row = row0 + wm * 32 + i * 8 + g;
                if (row >= n) continue;
#pragma unroll
                for (int ni = 0; ni < kNI2; ++ni) {
                    const int dcol = dcol0 + ni * 8 + 2 * t;
                    const float* a = acc_e[i >> 1][ni] + 2 * (i & 1);
                    if (dcol < d) atomic_add2(de + row * d + dcol, a[0] * unscale, a[1] * unscale);
                }
            }
        }
        {
            // dC[128 entries, slice] += dzᵀ [128, 64] · e[64, slice]; warp: 64 entries x half.
            float acc_c[4][kNI2][4] = {};
            warp_gemm<4, kNI2, kBM, true, true>(
                acc_c, dz + wm * 64 * static_cast<int>(sizeof(T)), kDzStride, ebuf + ncol,
                kChunkStride);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const i64 col = vocab_col(order, vpos0 + wm * 64 + i * 8 + g, v);
                if (col < 0) continue;
#pragma unroll
                for (int ni = 0; ni < kNI2; ++ni) {
                    const int dcol = dcol0 + ni * 8 + 2 * t;
                    const float* a = acc_c[i >> 1][ni] + 2 * (i & 1);
                    if (dcol < d) atomic_add2(dc + col * d + dcol, a[0] * unscale, a[1] * unscale);
                }
            }
        }
        __syncthreads();  // slice ch is consumed before iteration ch + 1 refills its buffer
    }
}
