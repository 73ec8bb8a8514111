// Fused epilogues of the first FFN GEMM: bias + GELU forward, dGELU + dbias backward.
// The GEMMs themselves run in cuBLAS through torch (the extension has no cuBLAS headers).
#pragma once
#include "kernels/common.cuh"

namespace fastbert {

// pre = acc + bias (rounded to T, kept for backward), out = gelu(pre) computed in fp32.
// acc and pre may be the same buffer. Grid-stride over VEC-element chunks of the (M, N) matrix.
template <typename T, int VEC>
__global__ void bias_gelu_fwd_kernel(const T* acc, const T* __restrict__ bias, T* pre,
                                     T* __restrict__ out, int64_t total, int n, bool tanh_approx) {
  const int64_t chunks = total / VEC;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < chunks;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t base = i * VEC;
    const int col = (int)(base % n);  // VEC divides n, so a chunk never crosses a row
    Vec<T, VEC> a = load_vec<T, VEC>(acc + base);
    Vec<T, VEC> p, o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      p.v[j] = from_float<T>(to_float(a.v[j]) + to_float(bias[col + j]));
      o.v[j] = from_float<T>(gelu(to_float(p.v[j]), tanh_approx));
    }
    store_vec<T, VEC>(pre + base, p);
    store_vec<T, VEC>(out + base, o);
  }
}

// dpre = dout * gelu'(pre) (rounded to T), and per-block column partial sums of dpre for dbias.
// Block (32, 8): threadIdx.x walks VEC-wide column chunks, threadIdx.y rows; block (bx, by) owns
// columns [bx * 32 * VEC, +32 * VEC) and rows by, by + gridDim.y, ... (each row group of 8).
// partial[by][col] is then summed over by by column_sum_kernel (deterministic).
template <typename T, int VEC>
__global__ void gelu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ pre,
                                T* __restrict__ dpre, float* __restrict__ partial, int m, int n,
                                bool tanh_approx) {
  __shared__ float col_sums[8][32 * VEC];
  const int c = (blockIdx.x * 32 + threadIdx.x) * VEC;
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
  if (c < n) {
    for (int r = blockIdx.y * 8 + threadIdx.y; r < m; r += gridDim.y * 8) {
      const int64_t base = (int64_t)r * n + c;
      Vec<T, VEC> g = load_vec<T, VEC>(dout + base);
      Vec<T, VEC> p = load_vec<T, VEC>(pre + base);
      Vec<T, VEC> d;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        d.v[j] = from_float<T>(to_float(g.v[j]) * gelu_grad(to_float(p.v[j]), tanh_approx));
        acc[j] += to_float(d.v[j]);  // dbias sums the rounded dpre, as the reference does
      }
      store_vec<T, VEC>(dpre + base, d);
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) col_sums[threadIdx.y][threadIdx.x * VEC + j] = acc[j];
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float s = 0.f;
      for (int y = 0; y < 8; ++y) s += col_sums[y][threadIdx.x * VEC + j];
      partial[(size_t)blockIdx.y * n + c + j] = s;
    }
  }
}

}  // namespace fastbert
