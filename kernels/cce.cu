// Cut cross-entropy forward: per row i of e [N, D] against c [V, D] (fp16 or bf16, fp32
// accumulate), with z_ij = e_i · c_j + bias_j (then softcap · tanh(z / softcap)):
// partial (max, Σ exp(z - max)) per (row, block of the vocabulary split, warp), the target's
// logit and Σ_j z_ij, without ever writing z. The caller merges the partials into lse.
//
// Work split: a block of 4 warps owns 16 rows of e and a contiguous range of vocabulary tiles of
// 128 entries (32 per warp: four n8 tiles of mma.sync m16n8k16, B = rows of c, "col" layout).
// Each lane keeps a running max and sum for the two rows it holds values of (groupID and
// groupID + 8), rescaled when the max grows (online softmax); the four lanes of a group merge at
// the end with shuffles. Requirements (checked by the caller): D % 16 == 0.

#include "common.cuh"

#ifndef CCE_T
#define CCE_T __half
#endif

namespace cce {

using namespace fg;

// Two consecutive values of a row (k even, so 4-byte aligned), or 0 for a row past the end.
__device__ __forceinline__ u32 load_pair(const CCE_T* base, i64 row, int rows, int ld, int k) {
    return row < rows ? *reinterpret_cast<const u32*>(base + row * ld + k) : 0u;
}

// Folds value z into the running (max, sum) of one row (-inf adds nothing; NaN poisons).
__device__ __forceinline__ void online(float z, float& max, float& sum) {
    if (z == FG_NEG_INF) return;
    if (z > max) {
        sum = sum * __expf(max - z) + 1.f;
        max = z;
    } else {
        sum += __expf(z - max);
    }
}

// Merges (max, sum) across the four lanes of a group.
__device__ __forceinline__ void merge_group(float& max, float& sum) {
#pragma unroll
    for (int offset = 1; offset < 4; offset <<= 1) {
        const float other_max = __shfl_xor_sync(0xffffffffu, max, offset);
        const float other_sum = __shfl_xor_sync(0xffffffffu, sum, offset);
        const float m = fmaxf(max, other_max);
        sum = (m == FG_NEG_INF) ? 0.f : sum * __expf(max - m) + other_sum * __expf(other_max - m);
        max = m;
    }
}

constexpr int kWarps = 4;
constexpr int kTilesPerWarp = 4;
constexpr int kBlockV = kWarps * kTilesPerWarp * 8;

}  // namespace cce

using namespace cce;

extern "C" __global__ void __launch_bounds__(kWarps * 32)
cce_forward(const CCE_T* __restrict__ e, const CCE_T* __restrict__ c,
            const CCE_T* __restrict__ bias, const i64* __restrict__ targets,
            float* __restrict__ part_max, float* __restrict__ part_sum,
            float* __restrict__ target_logit, float* __restrict__ logit_sum, int n, int v, int d,
            int tiles_per_split, float softcap) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int gid = lane >> 2;
    const int tig = lane & 3;
    const i64 ra = static_cast<i64>(blockIdx.x) * 16 + gid;
    const i64 rb = ra + 8;
    const i64 ta = ra < n ? targets[ra] : -1;
    const i64 tb = rb < n ? targets[rb] : -1;
    float max_a = FG_NEG_INF, sum_a = 0.f, max_b = FG_NEG_INF, sum_b = 0.f;
    float zsum_a = 0.f, zsum_b = 0.f;

    const int tile_begin = blockIdx.y * tiles_per_split;
    const int tile_end = min((v + kBlockV - 1) / kBlockV, tile_begin + tiles_per_split);
    for (int tile = tile_begin; tile < tile_end; ++tile) {
        const int col0 = tile * kBlockV + warp * kTilesPerWarp * 8;
        float acc[kTilesPerWarp][4] = {};
        for (int k = 0; k < d; k += 16) {
            const int kk = k + tig * 2;
            const u32 a[4] = {load_pair(e, ra, n, d, kk), load_pair(e, rb, n, d, kk),
                              load_pair(e, ra, n, d, kk + 8), load_pair(e, rb, n, d, kk + 8)};
#pragma unroll
            for (int t = 0; t < kTilesPerWarp; ++t) {
                const i64 col = col0 + t * 8 + gid;
                const u32 b[2] = {load_pair(c, col, v, d, kk), load_pair(c, col, v, d, kk + 8)};
                mma_16816(acc[t], a, b, CCE_T());
            }
        }
#pragma unroll
        for (int t = 0; t < kTilesPerWarp; ++t) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int col = col0 + t * 8 + tig * 2 + (i & 1);
                if (col >= v) continue;
                float z = acc[t][i] + (bias != nullptr ? to_float(bias[col]) : 0.f);
                if (softcap > 0.f) z = softcap * tanhf(z / softcap);
                if (i < 2) {
                    online(z, max_a, sum_a);
                    zsum_a += z;
                    if (col == ta) target_logit[ra] = z;
                } else {
                    online(z, max_b, sum_b);
                    zsum_b += z;
                    if (col == tb) target_logit[rb] = z;
                }
            }
        }
    }
    merge_group(max_a, sum_a);
    merge_group(max_b, sum_b);
#pragma unroll
    for (int offset = 1; offset < 4; offset <<= 1) {
        zsum_a += __shfl_xor_sync(0xffffffffu, zsum_a, offset);
        zsum_b += __shfl_xor_sync(0xffffffffu, zsum_b, offset);
    }
    if (tig == 0) {
        const i64 slot = static_cast<i64>(blockIdx.y) * kWarps + warp;  // partial index
        if (ra < n) {
            part_max[slot * n + ra] = max_a;
            part_sum[slot * n + ra] = sum_a;
            if (logit_sum != nullptr) atomicAdd(logit_sum + ra, zsum_a);
        }
        if (rb < n) {
            part_max[slot * n + rb] = max_b;
            part_sum[slot * n + rb] = sum_b;
            if (logit_sum != nullptr) atomicAdd(logit_sum + rb, zsum_b);
        }
    }
}
