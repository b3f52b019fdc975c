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
// Work split: a block of 4 warps owns 16 x kRowTiles rows of x (w4a16_gemm: 16, for decode-sized
// M, where the weight's bytes are the cost; w4a16_gemm_m64: 64, so that each dequantized B
// fragment feeds four mma) and 128 columns of W (32 per warp, four n8 tiles); blockIdx.z splits K
// into slices of whole 32-column steps; partial sums are added into the fp32 output with
// atomicAdd (the caller zeroes it and casts it to T afterwards). The kernel is bound by the
// latency of its weight loads: each step's words, scales and zeros are requested one step ahead
// of their use, and the caller splits K until the grid holds about eight blocks per SM.
// The weight is dequantized in registers, two codes per instruction and without int -> float
// conversions: a code q in the low mantissa bits of the 16-bit float M (1024 in fp16, 128 in
// bf16; both hold M + 15 exactly) is the float M + q, so (M + q) - (M + z) = q - z exactly and
// one multiply by s rounds (q - z) * s once to T, as that product in fp32 rounded to T would.

#include "common.cuh"

#ifndef W4_T
#define W4_T __half
#endif

using namespace fg;

// Outside the anonymous namespace: each build uses the overloads of one T only.
// The magic M above as T's bits in both halves of a register, and as a float.
__device__ __forceinline__ u32 magic2(__half) { return 0x64006400u; }
__device__ __forceinline__ u32 magic2(__nv_bfloat16) { return 0x43004300u; }
__device__ __forceinline__ float magic(__half) { return 1024.f; }
__device__ __forceinline__ float magic(__nv_bfloat16) { return 128.f; }

__device__ __forceinline__ u32 sub_mul2(u32 a, u32 b, u32 c, __half) {  // (a - b) * c
    const __half2 r = __hmul2(__hsub2(*reinterpret_cast<const __half2*>(&a),
                                      *reinterpret_cast<const __half2*>(&b)),
                              *reinterpret_cast<const __half2*>(&c));
    return *reinterpret_cast<const u32*>(&r);
}
__device__ __forceinline__ u32 sub_mul2(u32 a, u32 b, u32 c, __nv_bfloat16) {
    const __nv_bfloat162 r = __hmul2(__hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                             *reinterpret_cast<const __nv_bfloat162*>(&b)),
                                     *reinterpret_cast<const __nv_bfloat162*>(&c));
    return *reinterpret_cast<const u32*>(&r);
}

namespace {

constexpr int kWarps = 4;
constexpr int kTilesPerWarp = 4;  // n8 tiles
constexpr int kBlockN = kWarps * kTilesPerWarp * 8;
constexpr int kStepK = 32;

__device__ __forceinline__ u32 load_pair(const W4_T* row, int k, bool valid) {
    return valid ? *reinterpret_cast<const u32*>(row + k) : 0u;
}

// One 32-column step of a warp's four n8 tiles of W: the words of column col0 + 8t + group_id,
// its scale (s, s) and magic zero (M + z, M + z) as T pairs (all zero past N or past the warp's
// last step: the pairs then dequantize to (M + q - 0) * 0 = 0).
struct WeightStep {
    uint4 words[kTilesPerWarp];
    u32 scale2[kTilesPerWarp];
    u32 zero2[kTilesPerWarp];
};

__device__ __forceinline__ WeightStep load_step(const i32* __restrict__ qweight,
                                                const W4_T* __restrict__ scales,
                                                const u8* __restrict__ zeros, int col0, int n,
                                                int k, int group_size, int step, int step_end) {
    WeightStep w;
    const int kbase = step * kStepK;
    const int g = kbase / group_size;
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t) {
        const int col = col0 + t * 8;
        w.words[t] = make_uint4(0, 0, 0, 0);
        w.scale2[t] = 0u;
        w.zero2[t] = 0u;
        if (step < step_end && col < n) {
            w.words[t] = *reinterpret_cast<const uint4*>(qweight + static_cast<i64>(col) * (k / 8) +
                                                         kbase / 8);
            const i64 p = static_cast<i64>(col) * (k / group_size) + g;
            const float s = to_float(scales[p]);
            const float mz = magic(W4_T()) + static_cast<float>(zeros[p]);
            w.scale2[t] = pack2(s, s, W4_T());  // s is a T already: exact
            w.zero2[t] = pack2(mz, mz, W4_T());  // an integer <= M + 15: exact
        }
    }
    return w;
}

template <int kRowTiles>
__device__ __forceinline__ void gemm_tiles(const W4_T* __restrict__ x,
                                           const i32* __restrict__ qweight,
                                           const W4_T* __restrict__ scales,
                                           const u8* __restrict__ zeros, float* __restrict__ out,
                                           int m, int n, int k, int group_size,
                                           int steps_per_split) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int group_id = lane >> 2;  // row of A / C, column of B
    const int tig = lane & 3;        // thread in group
    const int row0 = blockIdx.y * 16 * kRowTiles + group_id;
    const int col0 = blockIdx.x * kBlockN + warp * kTilesPerWarp * 8;
    const int step_begin = blockIdx.z * steps_per_split;
    const int step_end = min(k / kStepK, step_begin + steps_per_split);

    float acc[kRowTiles][kTilesPerWarp][4] = {};
    WeightStep cur = load_step(qweight, scales, zeros, col0 + group_id, n, k, group_size,
                               step_begin, step_end);
    for (int step = step_begin; step < step_end; ++step) {
        const WeightStep next = load_step(qweight, scales, zeros, col0 + group_id, n, k,
                                          group_size, step + 1, step_end);
        const int kbase = step * kStepK;
        // A fragments of the two k16 halves of this step, per m16 tile (rows r and r + 8).
        u32 a[kRowTiles][2][4];
#pragma unroll
        for (int mi = 0; mi < kRowTiles; ++mi) {
            const int ra = row0 + mi * 16;
            const int rb = ra + 8;
            const W4_T* xa = x + static_cast<i64>(ra) * k;
            const W4_T* xb = x + static_cast<i64>(rb) * k;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int kk = kbase + h * 16 + tig * 2;
                a[mi][h][0] = load_pair(xa, kk, ra < m);
                a[mi][h][1] = load_pair(xb, kk, rb < m);
                a[mi][h][2] = load_pair(xa, kk + 8, ra < m);
                a[mi][h][3] = load_pair(xb, kk + 8, rb < m);
            }
        }
#pragma unroll
        for (int t = 0; t < kTilesPerWarp; ++t) {
            const u32 w[4] = {cur.words[t].x, cur.words[t].y, cur.words[t].z, cur.words[t].w};
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                // Byte tig of words 2h and 2h + 1: columns kbase + 16h + 2 tig (+1) and + 8.
                u32 b[2];
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const u32 byte = w[2 * h + j] >> (8 * tig);  // its low nibble: the lower k
                    const u32 q2 = (byte & 0xFu) | ((byte & 0xF0u) << 12) | magic2(W4_T());
                    b[j] = sub_mul2(q2, cur.zero2[t], cur.scale2[t], W4_T());
                }
#pragma unroll
                for (int mi = 0; mi < kRowTiles; ++mi) mma_16816(acc[mi][t], a[mi][h], b, W4_T());
            }
        }
        cur = next;
    }
#pragma unroll
    for (int mi = 0; mi < kRowTiles; ++mi) {
#pragma unroll
        for (int t = 0; t < kTilesPerWarp; ++t) {
            const int col = col0 + t * 8 + tig * 2;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = row0 + mi * 16 + ((i < 2) ? 0 : 8);
                const int c = col + (i & 1);
                if (r < m && c < n) {
                    atomicAdd(out + static_cast<i64>(r) * n + c, acc[mi][t][i]);
                }
            }
        }
    }
}

}  // namespace

#define W4A16_ENTRY(name, row_tiles)                                                               \
    extern "C" __global__ void __launch_bounds__(kWarps * 32)                                      \
        name(const W4_T* __restrict__ x, const i32* __restrict__ qweight,                          \
             const W4_T* __restrict__ scales, const u8* __restrict__ zeros,                        \
             float* __restrict__ out, int m, int n, int k, int group_size, int steps_per_split) { \
        gemm_tiles<row_tiles>(x, qweight, scales, zeros, out, m, n, k, group_size,               \
                              steps_per_split);                                                   \
    }

W4A16_ENTRY(w4a16_gemm, 1)
W4A16_ENTRY(w4a16_gemm_m64, 4)
