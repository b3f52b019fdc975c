// W4A16 GEMM: y[M, N] = x[M, K] · W_hatᵀ, W_hat[n, k] = (q[n, k] - zero[n, g]) * scale[n, g],
// g = k / group_size, on tensor cores (mma.sync m16n8k16, fp16 or bf16 in, fp32 accumulate).
//
// Layout of the weight (python/ferrograd/ops/w4a16/weight.py packs it): qweight is int32
// [N, K / 8]; word j of row n holds the stored codes of columns 8j .. 8j + 7 in its nibbles 0 ..
// 7. Byte t of a word then holds columns 8j + 2t (low nibble) and 8j + 2t + 1 (high nibble):
// exactly the pair a lane with threadID_in_group = t needs for the B fragment of m16n8k16 ("col" B
// = W rows), so each lane unpacks its own two bytes per k16 step without shuffles. scales are T
// [N, G], zeros uint8 [N, G] (8 for the symmetric scheme). Requirements (checked by the caller):
// K % 32 == 0 and group_size % 32 == 0, so that a 32-column step lies in one group.
//
// Work split: a block of 4 warps owns 16 rows of x and 128 columns of W (32 per warp, four n8
// tiles); blockIdx.z splits K into slices of whole 32-column steps; partial sums are added into
// the fp32 output with atomicAdd (the caller zeroes it and casts it to T afterwards).
// The weight is dequantized in registers ((q - z) * s in fp32, rounded once to T).

#include "common.cuh"

#ifndef W4_T
#define W4_T __half
#endif

using namespace fg;

namespace {

constexpr int kWarps = 4;
constexpr int kTilesPerWarp = 4;  // n8 tiles
constexpr int kBlockN = kWarps * kTilesPerWarp * 8;
constexpr int kStepK = 32;

__device__ __forceinline__ u32 load_pair(const W4_T* row, int k, bool valid) {
    return valid ? *reinterpret_cast<const u32*>(row + k) : 0u;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kWarps * 32)
w4a16_gemm(const W4_T* __restrict__ x, const i32* __restrict__ qweight,
           const W4_T* __restrict__ scales, const u8* __restrict__ zeros,
           float* __restrict__ out, int m, int n, int k, int group_size, int steps_per_split) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int group_id = lane >> 2;  // row of A / C, column of B
    const int tig = lane & 3;        // thread in group
    const int row0 = blockIdx.y * 16;
    const int col0 = blockIdx.x * kBlockN + warp * kTilesPerWarp * 8;
    const int steps = k / kStepK;
    const int step_begin = blockIdx.z * steps_per_split;
    const int step_end = min(steps, step_begin + steps_per_split);
    const int groups = k / group_size;
    const int words_per_row = k / 8;

    const int ra = row0 + group_id;
    const int rb = ra + 8;
    const W4_T* xa = x + static_cast<i64>(ra) * k;
    const W4_T* xb = x + static_cast<i64>(rb) * k;

    float acc[kTilesPerWarp][4] = {};
    for (int step = step_begin; step < step_end; ++step) {
        const int kbase = step * kStepK;
        const int g = kbase / group_size;
        // A fragments of the two k16 halves of this step.
        u32 a[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int kk = kbase + h * 16 + tig * 2;
            a[h][0] = load_pair(xa, kk, ra < m);
            a[h][1] = load_pair(xb, kk, rb < m);
            a[h][2] = load_pair(xa, kk + 8, ra < m);
            a[h][3] = load_pair(xb, kk + 8, rb < m);
        }
#pragma unroll
        for (int t = 0; t < kTilesPerWarp; ++t) {
            const int col = col0 + t * 8 + group_id;
            uint4 words = make_uint4(0, 0, 0, 0);
            float scale = 0.f, zero = 0.f;
            if (col < n) {
                const i64 base = static_cast<i64>(col) * words_per_row + kbase / 8;
                words = *reinterpret_cast<const uint4*>(qweight + base);
                const i64 p = static_cast<i64>(col) * groups + g;
                scale = to_float(scales[p]);
                zero = static_cast<float>(zeros[p]);
            }
            const u32 w[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                // Byte tig of words 2h and 2h + 1: columns kbase + 16h + 2 tig (+1) and + 8.
                u32 b[2];
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const u32 byte = (w[2 * h + j] >> (8 * tig)) & 0xFFu;
                    const float lo = (static_cast<float>(byte & 0xFu) - zero) * scale;
                    const float hi = (static_cast<float>(byte >> 4) - zero) * scale;
                    b[j] = pack2(lo, hi, W4_T());
                }
                mma_16816(acc[t], a[h], b, W4_T());
            }
        }
    }
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t) {
        const int col = col0 + t * 8 + tig * 2;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = (i < 2) ? ra : rb;
            const int c = col + (i & 1);
            if (r < m && c < n) {
                atomicAdd(out + static_cast<i64>(r) * n + c, acc[t][i]);
            }
        }
    }
}
