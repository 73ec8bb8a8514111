// Residual add + LayerNorm, forward and backward, fp32 statistics.
//
// A row is handled by a "row group" of threads: one warp per row when the row is small
// (blockDim = (32, rows_per_block)), the whole block when it is large (blockDim = (threads, 1)).
// Each thread owns the columns c = (threadIdx.x + i * blockDim.x) * VEC .. + VEC - 1, so the
// per-row scratch in shared memory is only ever touched by the thread that owns those columns.
//
// Dropout on x (template flag kDropout, so the plain path compiles as before): the pre-norm sum is
// x * keep / (1 - p) + residual; backward regenerates the mask and gives dx = ds * keep / (1 - p),
// dresidual = ds.
//
// The pre-norm form (add_layer_norm(..., return_residual=True), template flag kSum, so the plain
// path compiles as before): forward also stores the sum (sum_out, in x's dtype) and backward adds
// the gradient reaching it (dsum) to ds. The launchers pass kSum = (that pointer is not null).
#pragma once
#include "kernels/common.cuh"
#include "kernels/philox.cuh"

namespace fastbert {

// Dropout counter layout: element e = row * hidden + col uses word e % 4 of
// philox4x32(counter = (e / 4 low 32 bits, e / 4 high 32 bits, 0, 0), key = seed).
// scale[i] = 1 / (1 - p) if element e0 + i is kept, else 0. With VEC a multiple of 4, e0 is too
// (vectorised rows start at multiples of VEC), so one call serves four elements.
template <int VEC>
__device__ __forceinline__ void dropout_scales(const DropoutParams& d, uint64_t e0,
                                               float (&scale)[VEC]) {
  static_assert(VEC == 1 || VEC % 4 == 0, "vector width");
  if constexpr (VEC == 1) {
    const uint64_t g = e0 >> 2;
    const Philox4 rnd = philox4x32((uint32_t)g, (uint32_t)(g >> 32), 0, 0, d.key0, d.key1);
    scale[0] = rnd.x[e0 & 3] >= d.threshold ? d.keep_scale : 0.f;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const uint64_t g = (e0 + i) >> 2;
      const Philox4 rnd = philox4x32((uint32_t)g, (uint32_t)(g >> 32), 0, 0, d.key0, d.key1);
#pragma unroll
      for (int t = 0; t < 4; ++t) scale[i + t] = rnd.x[t] >= d.threshold ? d.keep_scale : 0.f;
    }
  }
}

// Sum over the row group. Block mode (blockDim.x > 32) uses `red` (32 floats of shared memory);
// every thread of the block must call it, and gets the full sum.
__device__ __forceinline__ float row_group_sum(float v, float* red) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // `red` may still be read by the previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.f;
  return warp_sum(v);
}

// y = LayerNorm(dropout(x) + residual) * weight + bias, and with kSum sum_out = dropout(x) +
// residual. Shared memory: blockDim.y * hidden floats (the pre-norm sums, so x and residual are
// read once) + 32 floats for block reductions.
template <typename T, typename W, int VEC, bool kDropout, bool kSum>
__global__ void add_layer_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                          const W* __restrict__ weight,
                                          const W* __restrict__ bias, T* __restrict__ y,
                                          T* __restrict__ sum_out, float* __restrict__ mean_out,
                                          float* __restrict__ rstd_out, int rows, int hidden,
                                          float eps, const DropoutParams dropout) {
  extern __shared__ float ln_smem[];
  float* sums = ln_smem + threadIdx.y * hidden;
  float* red = ln_smem + blockDim.y * hidden;
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // only in warp mode, which has no block-wide barrier
  const size_t offset = (size_t)row * hidden;

  float sum = 0.f;
  for (int c = threadIdx.x * VEC; c < hidden; c += blockDim.x * VEC) {
    Vec<T, VEC> xv = load_vec<T, VEC>(x + offset + c);
    Vec<T, VEC> rv;
    if (residual) rv = load_vec<T, VEC>(residual + offset + c);
    float keep[VEC];
    if constexpr (kDropout) dropout_scales<VEC>(dropout, offset + c, keep);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float s = to_float(xv.v[i]);
      if constexpr (kDropout) s *= keep[i];
      s += residual ? to_float(rv.v[i]) : 0.f;
      sums[c + i] = s;
      sum += s;
    }
  }
  const float mean = row_group_sum(sum, red) / hidden;
  float sq = 0.f;
  for (int c = threadIdx.x * VEC; c < hidden; c += blockDim.x * VEC) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float d = sums[c + i] - mean;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(row_group_sum(sq, red) / hidden + eps);
  for (int c = threadIdx.x * VEC; c < hidden; c += blockDim.x * VEC) {
    Vec<T, VEC> yv;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float xhat = (sums[c + i] - mean) * rstd;
      yv.v[i] = from_float<T>(xhat * to_float(weight[c + i]) + to_float(bias[c + i]));
    }
    store_vec<T, VEC>(y + offset + c, yv);
    if constexpr (kSum) {
      Vec<T, VEC> sv;
#pragma unroll
      for (int i = 0; i < VEC; ++i) sv.v[i] = from_float<T>(sums[c + i]);
      store_vec<T, VEC>(sum_out + offset + c, sv);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dsum with kSum), g = dy * weight;
// dresidual = ds, dx = ds (times keep / (1 - p) with dropout).
// dweight/dbias: each block sums its rows (grid-stride, fixed order) into per-block partials
// partial_dw/partial_db[blockIdx.x][hidden]; column_sum_kernel then adds the partials in a fixed
// order, so the result is deterministic. Shared memory: 2 * blockDim.y * hidden + 32 floats.
template <typename T, typename W, int VEC, bool kDropout, bool kSum>
__global__ void add_layer_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dsum,
                                          const T* __restrict__ x,
                                          const T* __restrict__ residual,
                                          const W* __restrict__ weight,
                                          const float* __restrict__ mean,
                                          const float* __restrict__ rstd, T* __restrict__ dx,
                                          T* __restrict__ dresidual, float* __restrict__ partial_dw,
                                          float* __restrict__ partial_db, int rows, int hidden,
                                          const DropoutParams dropout) {
  extern __shared__ float ln_smem[];
  float* acc_dw = ln_smem + threadIdx.y * hidden;
  float* acc_db = ln_smem + (blockDim.y + threadIdx.y) * hidden;
  float* red = ln_smem + 2 * blockDim.y * hidden;
  for (int c = threadIdx.x * VEC; c < hidden; c += blockDim.x * VEC) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc_dw[c + i] = acc_db[c + i] = 0.f;
  }

  // In block mode blockDim.y == 1, so every thread of the block runs the same rows (the
  // reductions' barriers are uniform); in warp mode the trip counts may differ per warp.
  for (int row = blockIdx.x * blockDim.y + threadIdx.y; row < rows;
       row += gridDim.x * blockDim.y) {
    const size_t offset = (size_t)row * hidden;
    const float mu = mean[row], rs = rstd[row];
    float sum_g = 0.f, sum_gx = 0.f;
    for (int c = threadIdx.x * VEC; c < hidden; c += blockDim.x * VEC) {
      Vec<T, VEC> gv = load_vec<T, VEC>(dy + offset + c);
      Vec<T, VEC> xv = load_vec<T, VEC>(x + offset + c);
      Vec<T, VEC> rv;
      if (residual) rv = load_vec<T, VEC>(residual + offset + c);
      float keep[VEC];
      if constexpr (kDropout) dropout_scales<VEC>(dropout, offset + c, keep);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float s = to_float(xv.v[i]);
        if constexpr (kDropout) s *= keep[i];
        s += residual ? to_float(rv.v[i]) : 0.f;
        float xhat = (s - mu) * rs;
        float g = to_float(gv.v[i]);
        float gw = g * to_float(weight[c + i]);
        acc_dw[c + i] += g * xhat;
        acc_db[c + i] += g;
        sum_g += gw;
        sum_gx += gw * xhat;
      }
    }
    const float mean_g = row_group_sum(sum_g, red) / hidden;
    const float mean_gx = row_group_sum(sum_gx, red) / hidden;
    for (int c = threadIdx.x * VEC; c < hidden; c += blockDim.x * VEC) {
      Vec<T, VEC> gv = load_vec<T, VEC>(dy + offset + c);
      Vec<T, VEC> xv = load_vec<T, VEC>(x + offset + c);
      Vec<T, VEC> rv, dsumv;
      if (residual) rv = load_vec<T, VEC>(residual + offset + c);
      if constexpr (kSum) dsumv = load_vec<T, VEC>(dsum + offset + c);
      float keep[VEC];
      if constexpr (kDropout) dropout_scales<VEC>(dropout, offset + c, keep);
      Vec<T, VEC> dsv, dxv;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float s = to_float(xv.v[i]);
        if constexpr (kDropout) s *= keep[i];
        s += residual ? to_float(rv.v[i]) : 0.f;
        float xhat = (s - mu) * rs;
        float gw = to_float(gv.v[i]) * to_float(weight[c + i]);
        float ds = rs * (gw - mean_g - xhat * mean_gx);
        if constexpr (kSum) ds += to_float(dsumv.v[i]);
        dsv.v[i] = from_float<T>(ds);
        if constexpr (kDropout) {
          dxv.v[i] = from_float<T>(ds * keep[i]);
        } else {
          dxv.v[i] = dsv.v[i];
        }
      }
      store_vec<T, VEC>(dx + offset + c, dxv);
      if (dresidual) store_vec<T, VEC>(dresidual + offset + c, dsv);
    }
  }

  __syncthreads();  // every row group's column sums are in shared memory
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  for (int c = tid; c < hidden; c += nthreads) {
    float sw = 0.f, sb = 0.f;
    for (int g = 0; g < (int)blockDim.y; ++g) {
      sw += ln_smem[g * hidden + c];
      sb += ln_smem[(blockDim.y + g) * hidden + c];
    }
    partial_dw[(size_t)blockIdx.x * hidden + c] = sw;
    partial_db[(size_t)blockIdx.x * hidden + c] = sb;
  }
}

// out[c] = sum_p partial[p][c], in a fixed order (deterministic).
template <typename W>
__global__ void column_sum_kernel(const float* __restrict__ partial, int nparts, int cols,
                                  W* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = 0.f;
  for (int p = 0; p < nparts; ++p) s += partial[(size_t)p * cols + c];
  out[c] = from_float<W>(s);
}

}  // namespace fastbert
