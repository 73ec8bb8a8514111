// What the attention kernels share: parameters, the dense / packed (varlen) sequence addressing,
// cp.async tile loads, key visibility, dropout draws, and the 16-byte-store epilogue.
//
// Masking: key j is visible to query i (both local to their sequence) when j < Sk, the key padding
// mask (dense only) says j is real, and j lies in i's band (flash-attn's sliding window,
// bottom-right aligned): i + Sk - Sq - left <= j <= i + Sk - Sq + right, a side of -1 unbounded;
// causal is the band's right side at 0, folded in by the launcher. Loops visit only the tiles a
// band reaches.
// A query that sees no key gets out = 0 and lse = +inf. Softmax runs in the exp2 domain.
//
// Dropout: the keep decision of (query i, key j) is word 2 (i & 1) + (j & 1) of
// philox4x32(counter = (j / 2, i / 2, h, b), key = seed): one call draws a 2 x 2 block. In the
// forward (and the dQ kernel) a lane holds queries g, g+8 and keys 2c, 2c+1 of each 8-key fragment;
// in the dK/dV kernel it holds keys g, g+8 and queries 2c, 2c+1. Either way the lanes g (even) and
// g+1 (lane ^ 4) together need the blocks of rows {g, g+1} and {g+8, g+9}: each draws one of them
// and they swap half of it (draw_pair_words), so every Philox call serves 4 elements. The fp32
// kernels map the same words to their own threads (attention_fp32.cuh keep_bits_*).
#pragma once
#include <stdint.h>

#include "kernels/attention_mma.cuh"
#include "kernels/common.cuh"
#include "kernels/philox.cuh"

namespace fastbert {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kUnbounded = 1 << 30;  // a band side beyond any key distance

// Element strides of a (B, S, H, D) tensor (or (total, H, D) with b = 0) whose last stride is 1.
struct Strides {
  int64_t b, s, h;
};

template <typename T> struct Params {
  const T* q;
  const T* k;
  const T* v;
  const uint8_t* mask;  // dense (B, Sk), nonzero = real key; nullptr = none
  const int* cu_q;      // varlen (B + 1) sequence starts; nullptr = dense
  const int* cu_k;
  T* out;
  float* lse;  // dense (B, H, Sq), varlen (H, total_q): element b * lse_b + h * lse_h + row
  const T* dout;
  T* dq;            // deterministic path: written by dq_kernel
  float* dq_accum;  // atomic path: fp32, laid out like a contiguous q; nullptr = no atomics
  T* dk;
  T* dv;
  float* delta;  // rowsum(dout * out), laid out like lse
  Strides q_st, k_st, v_st, out_st, dout_st, dq_st, dk_st, dv_st, acc_st;
  int64_t lse_b, lse_h;
  int B, H, Sq, Sk;  // dense: the lengths; varlen: max_seqlen (an upper bound)
  float scale;
  float scale_log2;  // scale * log2(e): scores in the exp2 domain
  // the band: key j visible from query i when band_lo <= j - i - (Sk - Sq) <= band_hi, i.e.
  // (-left, right) of the window, causal's right = 0; an unbounded side is -+kUnbounded
  int band_lo, band_hi;
  DropoutParams dropout;  // read only by the kDropout kernels
};

// One sequence: where its rows start in the (packed) tensors and how long it is.
struct Seq {
  int q0, k0, Sq, Sk;
};

template <typename T> __device__ __forceinline__ Seq sequence(const Params<T>& p, int b) {
  if (p.cu_q == nullptr) return Seq{0, 0, p.Sq, p.Sk};
  const int q0 = p.cu_q[b], k0 = p.cu_k[b];
  return Seq{q0, k0, p.cu_q[b + 1] - q0, p.cu_k[b + 1] - k0};
}

// Query i's band in one sequence: the keys j whose distance from its (bottom-right aligned)
// diagonal, d = j - i - shift with shift = Sk - Sq, lies in [lo, hi] (Params::band_lo / band_hi,
// kernel parameters: read from the constant bank, no registers). A rectangle of queries [i0, i1]
// x keys [j0, j1] holds d in [j0 - i1 - shift, j1 - i0 - shift]: it meets the band (some pair
// visible) or lies inside it (every pair) by comparing that range with [lo, hi].
struct Band {
  int shift, lo, hi;
  __device__ __forceinline__ bool has(int i, int j) const {
    return j - i - shift >= lo && j - i - shift <= hi;
  }
  __device__ __forceinline__ bool meets(int i0, int i1, int j0, int j1) const {
    return j0 - i1 - shift <= hi && j1 - i0 - shift >= lo;
  }
  __device__ __forceinline__ bool inside(int i0, int i1, int j0, int j1) const {
    return j1 - i0 - shift <= hi && j0 - i1 - shift >= lo;
  }
  // Keys [key_begin(i0), key_end(i1, Sk)) hold every key some query in [i0, i1] sees, queries
  // [query_begin(j0), query_end(j1, Sq)) every query that sees a key in [j0, j1]. d lies in
  // [1 - Sk, Sq - 1]: clamping an unbounded side there keeps the sums in range.
  __device__ __forceinline__ int key_begin(int i0) const { return max(0, i0 + shift + lo); }
  __device__ __forceinline__ int key_end(int i1, int Sk) const {
    return min(Sk, max(0, i1 + shift + min(hi, Sk - shift) + 1));
  }
  __device__ __forceinline__ int query_begin(int j0) const { return max(0, j0 - shift - hi); }
  __device__ __forceinline__ int query_end(int j1, int Sq) const {
    return min(Sq, max(0, j1 - shift - max(lo, -(Sq + shift)) + 1));
  }
};

template <typename T>
__device__ __forceinline__ Band band_of(const Params<T>& p, const Seq& seq) {
  return Band{seq.Sk - seq.Sq, p.band_lo, p.band_hi};
}

// Row 0 of head h of sequence b (row `start` of the packed tensor).
template <typename P>
__device__ __forceinline__ P* row0(P* base, const Strides& st, int b, int start, int h) {
  return base + b * st.b + (int64_t)start * st.s + h * st.h;
}

// Rows [r0, r0 + kRows) of a sequence of `len` rows into a [kRows][D + 8] shared tile; rows past
// the end are zero-filled (so they add nothing to any product and never read another sequence).
template <int kRows, int D, int kThreads, typename T>
__device__ __forceinline__ void load_rows_async(T* dst, const T* src, int64_t stride, int r0,
                                                int len) {
  constexpr int kChunks = D / 8;  // 16-byte pieces per row
#pragma unroll
  for (int i = threadIdx.x; i < kRows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool valid = r0 + r < len;
    cp_async_16(dst + r * (D + 8) + c, valid ? src + (int64_t)(r0 + r) * stride + c : src, valid);
  }
}

// Visible keys of the tile n0 .. n0 + 63 (padding mask and sequence end only), bit j for key
// n0 + j;
// every lane of the warp gets the same mask.
__device__ __forceinline__ uint64_t key_bits(const uint8_t* mask, int n0, int Sk) {
  const int left = Sk - n0;
  if (mask == nullptr) return left >= 64 ? ~0ull : (1ull << left) - 1;
  const int lane = threadIdx.x & 31;
  const bool lo = lane < left && mask[n0 + lane] != 0;
  const bool hi = lane + 32 < left && mask[n0 + lane + 32] != 0;
  return (uint64_t)__ballot_sync(0xffffffffu, lo) |
         ((uint64_t)__ballot_sync(0xffffffffu, hi) << 32);
}

// Keep decisions of this lane's four elements of one fragment, as (element 0, element 1) of its
// row-group g and of g + 8. `row_lo` is the lane's own first row index (query in the forward,
// key in the dK/dV kernel), `col` its first column (even). kRowsAreQueries selects how the 2 x 2
// Philox block maps to (row, column).
template <bool kRowsAreQueries>
__device__ __forceinline__ void draw_pair_words(const DropoutParams& d, int b, int h, int row_lo,
                                                int col, uint32_t (&lo)[2], uint32_t (&hi)[2]) {
  const bool odd = (threadIdx.x >> 2) & 1;  // g odd: this lane draws the block of rows g+7, g+8
  const int row = odd ? row_lo + 8 : row_lo;
  const int qi = kRowsAreQueries ? row : col, kj = kRowsAreQueries ? col : row;
  const Philox4 r = philox4x32((uint32_t)kj >> 1, (uint32_t)qi >> 1, (uint32_t)h, (uint32_t)b,
                               d.key0, d.key1);
  // Words of (even row, col), (even row, col + 1), (odd row, col), (odd row, col + 1).
  const uint32_t e0 = r.x[0], e1 = kRowsAreQueries ? r.x[1] : r.x[2];
  const uint32_t o0 = kRowsAreQueries ? r.x[2] : r.x[1], o1 = r.x[3];
  // The even lane keeps its even row and sends the odd row; the odd lane the opposite.
  const uint32_t s0 = __shfl_xor_sync(0xffffffffu, odd ? e0 : o0, 4);
  const uint32_t s1 = __shfl_xor_sync(0xffffffffu, odd ? e1 : o1, 4);
  lo[0] = odd ? s0 : e0;
  lo[1] = odd ? s1 : e1;
  hi[0] = odd ? o0 : s0;
  hi[1] = odd ? o1 : s1;
}

// Keep bits of this lane's elements in kNF fragments (columns col0 + 8f): bit 4f + e says whether
// element e of fragment f (C layout: e = 0, 1 row g, e = 2, 3 row g + 8) is kept. The loop is
// not unrolled so that only one Philox state is live at a time (registers).
template <bool kRowsAreQueries, int kNF>
__device__ __forceinline__ uint32_t dropout_keep_bits(const DropoutParams& d, int b, int h,
                                                      int row_lo, int col0) {
  static_assert(kNF * 4 <= 32, "one bit per element of a 32-bit word");
  uint32_t bits = 0;
#pragma unroll 1
  for (int f = 0; f < kNF; ++f) {
    uint32_t lo[2], hi[2];
    draw_pair_words<kRowsAreQueries>(d, b, h, row_lo, col0 + 8 * f, lo, hi);
    const uint32_t four = (uint32_t)(lo[0] >= d.threshold) | (uint32_t)(lo[1] >= d.threshold) << 1 |
                          (uint32_t)(hi[0] >= d.threshold) << 2 |
                          (uint32_t)(hi[1] >= d.threshold) << 3;
    bits |= four << (4 * f);
  }
  return bits;
}

// Writes a warp's 16 x D fp32 accumulator rows (C fragments, row g times mult_lo, g + 8 times
// mult_hi) as T to rows row0 .. row0 + 15 of a sequence of `len` rows, through this warp's own
// [16][D + 8] shared staging rows so that global stores are 16 bytes wide.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], float mult_lo,
                                           float mult_hi, T* stage, T* dst, int64_t stride,
                                           int row0, int len) {
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int f = 0; f < D / 8; ++f) {
    *reinterpret_cast<uint32_t*>(stage + g * (D + 8) + f * 8 + 2 * c) =
        pack2<T>(acc[f][0] * mult_lo, acc[f][1] * mult_lo);
    *reinterpret_cast<uint32_t*>(stage + (g + 8) * (D + 8) + f * 8 + 2 * c) =
        pack2<T>(acc[f][2] * mult_hi, acc[f][3] * mult_hi);
  }
  __syncwarp();
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = lane; i < 16 * kChunks; i += 32) {
    const int r = i / kChunks, c8 = (i % kChunks) * 8;
    if (row0 + r < len)
      *reinterpret_cast<uint4*>(dst + (int64_t)(row0 + r) * stride + c8) =
          *reinterpret_cast<const uint4*>(stage + r * (D + 8) + c8);
  }
}

}  // namespace attn
}  // namespace fastbert
