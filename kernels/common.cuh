// Device helpers shared by the kernels of kernels/ (compiled by NVRTC through ferrograd.cuda).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// NVRTC has no <cstdint> or <cmath>.
using u8 = unsigned char;
using u32 = unsigned int;
using i32 = int;
using i64 = long long;
#define FG_NEG_INF (-__int_as_float(0x7f800000))

namespace fg {

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

// d += a (16x16, row) · b (16x8, col) on tensor cores, fp32 accumulators; the element type
// picks the instruction.
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

}  // namespace fg
