// Rotary position embeddings (flash-attn's apply_rotary_emb), forward and backward in one kernel:
// the backward is the same rotation by the opposite angle (conjugate: sin -> -sin).
//
// x (rows, H, D) with element strides (row, head) and contiguous heads; out (rows, H, D)
// contiguous; positions[row] (int64) is the row's index into cos / sin (table_rows, half). The
// first 2 * half dims of each head turn: pairs (i, i + half), or (2i, 2i + 1) when interleaved;
// the rest are copied. fp32 math; every element of x is read once and written once.
#pragma once
#include <limits>

#include "kernels/common.cuh"

namespace fastbert {

// Work is split into items, each a thread's: per head, half / P "turn" items (P pairs each)
// then (D - 2 * half) / W "copy" items (W dims each). Vectorised: P pairs fill one 16-byte load
// of each half (P = 16 / sizeof(T)), or one load holds P interleaved pairs (P = 8 / sizeof(T));
// W = 16 / sizeof(T). Scalar: P = W = 1, one element per access.
template <typename T, typename C, int P, int W, bool kInterleaved>
__global__ void rotary_kernel(const T* __restrict__ x, const C* __restrict__ cos_table,
                              const C* __restrict__ sin_table,
                              const int64_t* __restrict__ positions, T* __restrict__ out,
                              int64_t rows, int heads, int head_dim, int half, int64_t table_rows,
                              int64_t row_stride, int64_t head_stride, bool conjugate) {
  const int turn_items = half / P;
  const int items_per_head = turn_items + (head_dim - 2 * half) / W;
  const int64_t total = rows * heads * items_per_head;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row_head = i / items_per_head;
    const int item = (int)(i - row_head * items_per_head);
    const int64_t row = row_head / heads;
    const int head = (int)(row_head - row * heads);
    const T* xh = x + row * row_stride + head * head_stride;
    T* oh = out + row_head * head_dim;
    if (item >= turn_items) {  // dims past the rotary ones pass through
      const int d = 2 * half + (item - turn_items) * W;
      store_vec<T, W>(oh + d, load_vec<T, W>(xh + d));
      continue;
    }
    const int f = item * P;  // first frequency of this item
    const int64_t pos = positions[row];
    float c[P], s[P];
    if (pos < 0 || pos >= table_rows) {  // no host sync checks per-sequence offsets: NaN shows it
#pragma unroll
      for (int j = 0; j < P; ++j) c[j] = s[j] = std::numeric_limits<float>::quiet_NaN();
    } else {
      const Vec<C, P> cv = load_vec<C, P>(cos_table + pos * half + f);
      const Vec<C, P> sv = load_vec<C, P>(sin_table + pos * half + f);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        c[j] = to_float(cv.v[j]);
        s[j] = conjugate ? -to_float(sv.v[j]) : to_float(sv.v[j]);
      }
    }
    if constexpr (kInterleaved) {
      // P pairs (2f + 2j, 2f + 2j + 1) in 2P contiguous elements; scalar: two single loads
      Vec<T, 2 * P> v, o;
      if constexpr (P == 1) {
        v.v[0] = xh[2 * f];
        v.v[1] = xh[2 * f + 1];
      } else {
        v = load_vec<T, 2 * P>(xh + 2 * f);
      }
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const float x1 = to_float(v.v[2 * j]), x2 = to_float(v.v[2 * j + 1]);
        o.v[2 * j] = from_float<T>(x1 * c[j] - x2 * s[j]);
        o.v[2 * j + 1] = from_float<T>(x1 * s[j] + x2 * c[j]);
      }
      if constexpr (P == 1) {
        oh[2 * f] = o.v[0];
        oh[2 * f + 1] = o.v[1];
      } else {
        store_vec<T, 2 * P>(oh + 2 * f, o);
      }
    } else {
      const Vec<T, P> v1 = load_vec<T, P>(xh + f), v2 = load_vec<T, P>(xh + half + f);
      Vec<T, P> o1, o2;
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const float x1 = to_float(v1.v[j]), x2 = to_float(v2.v[j]);
        o1.v[j] = from_float<T>(x1 * c[j] - x2 * s[j]);
        o2.v[j] = from_float<T>(x1 * s[j] + x2 * c[j]);
      }
      store_vec<T, P>(oh + f, o1);
      store_vec<T, P>(oh + half + f, o2);
    }
  }
}

}  // namespace fastbert
