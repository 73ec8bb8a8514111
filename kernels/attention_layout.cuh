// Which shared-memory row each lane hands to ldmatrix.x4 for the four fragment shapes the
// attention kernels use (element offsets into a tile with row stride `ld`). See the layouts in
// kernels/attention_mma.cuh; matrix i of an .x4 load takes its row addresses from lanes 8i..8i+7.
// Plain integer math with no CUDA dependency, so tests/test_cuda_attention_static.py builds this
// header for the host and replays the offsets through a model of ldmatrix and mma.m16n8k16.
#pragma once

#ifdef __CUDACC__
#define FASTBERT_LAYOUT_FN __host__ __device__ __forceinline__
#else
#define FASTBERT_LAYOUT_FN inline
#endif

namespace fastbert {
namespace attn {

// A fragment of rows r0..r0+15, columns k0..k0+15 of a row-major tile (non-transposed ldmatrix):
// matrices (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8) -> a[0..3].
FASTBERT_LAYOUT_FN int a_frag_offset(int lane, int r0, int k0, int ld) {
  return (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + k0 + (lane >> 4) * 8;
}

// Tile X stored [n][k]: B = X^T fragments (B[k][n] = X[n][k]) for n0..n0+7 (regs 0, 1) and
// n0+8..n0+15 (regs 2, 3), k0..k0+15 (non-transposed ldmatrix). S = Q K^T with X = K.
FASTBERT_LAYOUT_FN int bt_frag_offset(int lane, int n0, int k0, int ld) {
  return (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8;
}

// Tile X stored [k][n]: B = X fragments for k0..k0+15 and n0..n0+7 (regs 0, 1), n0+8..n0+15
// (regs 2, 3) (transposed ldmatrix). O = P V with X = V.
FASTBERT_LAYOUT_FN int b_frag_offset(int lane, int k0, int n0, int ld) {
  return (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8;
}

// Tile X stored [k][m]: A = X^T fragment of rows m0..m0+15, columns k0..k0+15 (transposed
// ldmatrix). dQ = dS K with dS^T in shared memory.
FASTBERT_LAYOUT_FN int at_frag_offset(int lane, int m0, int k0, int ld) {
  return (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8;
}

}  // namespace attn
}  // namespace fastbert
