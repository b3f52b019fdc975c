// Device helpers shared by the kernels of kernels/ (compiled by NVRTC through ferrograd.cuda).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// NVRTC has no <cstdint>, <cmath> or <type_traits>.
using u8 = unsigned char;
using u32 = unsigned int;
using i32 = int;
using i64 = long long;
using u64 = unsigned long long;
#define FG_NEG_INF (-__int_as_float(0x7f800000))

namespace fg {

template <class T>
struct is_f32 {
    static constexpr bool value = false;
};
template <>
struct is_f32<float> {
    static constexpr bool value = true;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Two floats rounded to T in one register, the first in the low half (the smaller k of a pair).
__device__ __forceinline__ u32 pack2(float lo, float hi, __half) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}
__device__ __forceinline__ u32 pack2(float lo, float hi, __nv_bfloat16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

// p[0] = lo, p[1] = hi rounded to T (p aligned to the pair).
__device__ __forceinline__ void store2(float* p, float lo, float hi) {
    *reinterpret_cast<float2*>(p) = make_float2(lo, hi);
}
template <class T>
__device__ __forceinline__ void store2(T* p, float lo, float hi) {
    *reinterpret_cast<u32*>(p) = pack2(lo, hi, T());
}

// d += a (16x16, row) · b (16x8, col) on tensor cores, fp32 accumulators; the element type
// picks the instruction. Fragments (lane = 4 * groupID + t): a = A[g][2t..], A[g+8][2t..],
// A[g][2t+8..], A[g+8][2t+8..]; b = B[2t..][g], B[2t+8..][g]; d = C[g][2t..], C[g+8][2t..].
#define FG_MMA_16816(T, PTX_TYPE)                                                               \
    __device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4],                \
                                              const u32 (&b)[2], T) {                          \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE ".f32 "   \
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"       \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                          \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));     \
    }
FG_MMA_16816(__half, "f16")
FG_MMA_16816(__nv_bfloat16, "bf16")
#undef FG_MMA_16816

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices from shared memory; lanes 8q .. 8q + 7 give the 16-byte rows of
// matrix q, register q receives it: row lane / 4, columns 2 (lane % 4) and + 1.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}
// The same with each matrix transposed: register q receives rows 2 (lane % 4) and + 1 of
// column lane / 4.
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 writes zeros (src must still be a
// valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// Sum over the lanes that differ in the bits from..to of the lane index (powers of two):
// sum_xor<1, 2> adds within a group of four lanes, sum_xor<4, 16> across the eight groups.
template <int from, int to>
__device__ __forceinline__ float sum_xor(float v) {
#pragma unroll
    for (int offset = from; offset <= to; offset <<= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// p[0] += a, p[1] += b (p 8-byte aligned): one vector reduction on sm_90, two before.
__device__ __forceinline__ void atomic_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

}  // namespace fg
