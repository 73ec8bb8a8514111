// Tensor-core building blocks of the attention kernels, as inline PTX: mma.sync.m16n8k16 (fp16 or
// bf16 in, fp32 accumulate), ldmatrix (shared -> fragment), cp.async (global -> shared, 16 bytes,
// bypassing registers). Sources: the PTX ISA, sections "Matrix Fragments for mma.m16n8k16" and
// "ldmatrix". tests/test_cuda_attention_static.py::test_fragment_index_model replays the index math below on the
// host (a model of both instructions) and checks products against a plain matmul.
//
// Fragment layouts, per warp, with g = lane / 4 (the "group") and c = lane % 4:
//   A (16 x 16, row major), 4 regs of 2 elements: a[0] = A[g][2c, 2c+1], a[1] = A[g+8][2c, 2c+1],
//     a[2] = A[g][2c+8, 2c+9], a[3] = A[g+8][2c+8, 2c+9].
//   B (16 x 8, "col": B[k][n]), 2 regs: b[0] = B[2c, 2c+1][g], b[1] = B[2c+8, 2c+9][g].
//   C (16 x 8, fp32), 4 floats: c[0..1] = C[g][2c, 2c+1], c[2..3] = C[g+8][2c, 2c+1].
// The low 16 bits of a register hold the element with the smaller column (A) or row (B) index.
// ldmatrix.x4: lanes 8i .. 8i+7 give the row addresses of 8x8 matrix i (16 bytes per row); result
// register i gets matrix i with lane l holding M[l/4][2(l%4), +1], or with .trans
// M[2(l%4), +1][l/4].
// So one C fragment pair (two adjacent 8-column fragments of S = row g's 16 keys) re-packed to
// 16-bit is exactly the A fragment of a 16-deep k step: S and P never leave registers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "kernels/attention_layout.cuh"

// The host emulation of the CUDA code (tests/cuda_emulation.py, FASTBERT_HOST_EMULATION) supplies
// the functions of this section itself (tests/cuda_emulation.h), from the same PTX definitions.
#ifndef FASTBERT_HOST_EMULATION
namespace fastbert {
namespace attn {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one 16x8x16 product.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two 16-bit values (lo in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// 16 bytes global -> shared without passing through registers; when !valid the destination is
// zero-filled (src-size 0) and nothing is read.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

// 4 bytes (lse / delta rows), zero-filled when !valid.
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace attn
}  // namespace fastbert
#endif  // FASTBERT_HOST_EMULATION
