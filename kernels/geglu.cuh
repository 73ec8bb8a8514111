// Fused epilogues of the GeGLU GEMM (ModernBERT's Wi): pre = x W^T is (M, 2N), the GELU half a
// in columns [0, N) and the gate half g in [N, 2N). Forward: bias + gelu(a) * g; backward:
// d(pre) for both halves + dbias partial sums. The GEMMs run in cuBLAS through torch.
#pragma once
#include "kernels/common.cuh"

namespace fastbert {

// pre += bias when bias is not null (rounded to T, kept for backward), out = gelu(a) * g in fp32.
// Grid-stride over VEC-wide chunks of the (M, N) output; VEC divides n, so a chunk never crosses
// a row, and its a and g chunks sit at the same column of the two halves.
template <typename T, int VEC>
__global__ void geglu_fwd_kernel(T* __restrict__ pre, const T* __restrict__ bias,
                                 T* __restrict__ out, int64_t m, int n, bool tanh_approx) {
  const int64_t chunks = m * n / VEC;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < chunks;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i * VEC / n;
    const int col = (int)(i * VEC - row * n);
    T* pa = pre + row * 2 * n + col;
    Vec<T, VEC> a = load_vec<T, VEC>(pa), g = load_vec<T, VEC>(pa + n), o;
    if (bias != nullptr) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        a.v[j] = from_float<T>(to_float(a.v[j]) + to_float(bias[col + j]));
        g.v[j] = from_float<T>(to_float(g.v[j]) + to_float(bias[n + col + j]));
      }
      store_vec<T, VEC>(pa, a);
      store_vec<T, VEC>(pa + n, g);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      o.v[j] = from_float<T>(gelu(to_float(a.v[j]), tanh_approx) * to_float(g.v[j]));
    store_vec<T, VEC>(out + row * n + col, o);
  }
}

// dpre = [dout * g * gelu'(a), dout * gelu(a)] (rounded to T) and per-block column partial sums
// of it for dbias. Block (32, 8) as gelu_bwd_kernel's: threadIdx.x walks VEC-wide column chunks
// of the N output columns, threadIdx.y rows; block (bx, by) owns output columns
// [bx * 32 * VEC, +32 * VEC) and the row groups by, by + gridDim.y, ...; partial[by][0, 2N) is
// summed over by by column_sum_kernel (deterministic).
template <typename T, int VEC>
__global__ void geglu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ pre,
                                 T* __restrict__ dpre, float* __restrict__ partial, int m, int n,
                                 bool tanh_approx) {
  __shared__ float col_sums[2][8][32 * VEC];  // [a half, g half][row lane][column]
  const int c = (blockIdx.x * 32 + threadIdx.x) * VEC;
  float acc_a[VEC], acc_g[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc_a[j] = acc_g[j] = 0.f;
  if (c < n) {
    for (int r = blockIdx.y * 8 + threadIdx.y; r < m; r += gridDim.y * 8) {
      const Vec<T, VEC> d = load_vec<T, VEC>(dout + (int64_t)r * n + c);
      const int64_t base = (int64_t)r * 2 * n + c;
      const Vec<T, VEC> a = load_vec<T, VEC>(pre + base), g = load_vec<T, VEC>(pre + base + n);
      Vec<T, VEC> da, dg;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float dj = to_float(d.v[j]), aj = to_float(a.v[j]);
        da.v[j] = from_float<T>(dj * to_float(g.v[j]) * gelu_grad(aj, tanh_approx));
        dg.v[j] = from_float<T>(dj * gelu(aj, tanh_approx));
        acc_a[j] += to_float(da.v[j]);  // dbias sums the rounded dpre, as the reference does
        acc_g[j] += to_float(dg.v[j]);
      }
      store_vec<T, VEC>(dpre + base, da);
      store_vec<T, VEC>(dpre + base + n, dg);
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    col_sums[0][threadIdx.y][threadIdx.x * VEC + j] = acc_a[j];
    col_sums[1][threadIdx.y][threadIdx.x * VEC + j] = acc_g[j];
  }
  __syncthreads();
  // rows 0 and 1 of the block write the a and g halves' sums
  if (threadIdx.y < 2 && c < n) {
    const int half = threadIdx.y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float s = 0.f;
      for (int y = 0; y < 8; ++y) s += col_sums[half][y][threadIdx.x * VEC + j];
      partial[(size_t)blockIdx.y * 2 * n + half * n + c + j] = s;
    }
  }
}

}  // namespace fastbert
