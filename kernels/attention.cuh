// FlashAttention-2 style attention on tensor cores (nvcuda::wmma, m16n16k16, fp16/bf16 inputs,
// fp32 accumulation), forward and backward, for head dims 32, 64 and 128.
//
// Tiles are 64 queries x 64 keys, 4 warps per block; warp w owns 16 rows of each tile. Softmax
// runs in the exp2 domain (scores pre-multiplied by scale * log2(e)). WMMA accumulator layouts
// are opaque, so score tiles and the running output go through shared memory (fp32) where one
// pair of lanes owns one row. Masking: a key is visible when it is < Sk, real in the key-padding
// mask, and (causal) j <= i + Sk - Sq. A query with no visible key gets out = 0, lse = +inf.
// Backward is two kernels without atomics (dK/dV per key block, dQ per query block), so it is
// always deterministic.
//
// Dropout (template flag kDropout, so the plain path compiles as before) acts on the normalised
// probabilities: lse stays that of the undropped softmax, forward multiplies P by keep / (1 - p)
// before P V, and backward regenerates the same mask (attention_random below) for dV = P_drop^T dO
// and dP_drop = keep / (1 - p) * dO V^T, with dS = P * (dP_drop - rowsum(dO * O)).
#pragma once
#include <mma.h>
#include <stdint.h>

#include "kernels/common.cuh"
#include "kernels/philox.cuh"

namespace fastbert {
namespace attn {

using namespace nvcuda;

constexpr int kBlockM = 64;  // queries per tile
constexpr int kBlockN = 64;  // keys per tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kScoreLd = kBlockN + 4;  // fp32 score rows, padded against bank conflicts
constexpr int kProbLd = kBlockN + 8;   // fp16/bf16 probability rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Element strides of a (B, S, H, D) tensor whose last stride is 1.
struct Strides {
  int64_t b, s, h;
};

template <typename T> struct Params {
  const T* q;
  const T* k;
  const T* v;
  const uint8_t* mask;  // (B, Sk), nonzero = real key; nullptr = none
  T* out;
  float* lse;  // (B, H, Sq)
  const T* dout;
  T* dq;
  T* dk;
  T* dv;
  float* delta;  // (B, H, Sq): rowsum(dout * out), written by bwd_delta_kernel
  Strides q_st, k_st, v_st, out_st, dout_st, dq_st, dk_st, dv_st;
  int B, H, Sq, Sk;
  float scale;
  bool causal;
  DropoutParams dropout;  // used only by the kDropout kernels
};

// Dropout counter layout: element (b, h, query i, key j) uses word j % 4 of
// philox4x32(counter = (j / 4, i, h, b), key = seed), so one call covers four adjacent keys.
__device__ __forceinline__ Philox4 attention_random(const DropoutParams& d, int b, int h, int qi,
                                                    int kj) {
  return philox4x32((uint32_t)kj >> 2, (uint32_t)qi, (uint32_t)h, (uint32_t)b, d.key0, d.key1);
}

// Score columns handled per step: 4 with dropout (one Philox call), else 1 (the plain loop).
template <bool kDropout> constexpr int kRandStep = kDropout ? 4 : 1;

// r.x[i] for a run-time i, by selects (indexing the array would put it in local memory).
__device__ __forceinline__ uint32_t philox_word(const Philox4& r, int i) {
  return i == 0 ? r.x[0] : i == 1 ? r.x[1] : i == 2 ? r.x[2] : r.x[3];
}

template <int D> constexpr int tile_ld() { return D + 8; }  // fp16/bf16 tile rows, padded

// Rows [row0, row0 + 64) of one (b, h) slice into a [64][D + 8] shared tile, zeros past `rows`.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int row0,
                                          int rows) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kVecsPerRow = D / kVec;
  for (int i = threadIdx.x; i < 64 * kVecsPerRow; i += kThreads) {
    const int r = i / kVecsPerRow, c = (i % kVecsPerRow) * kVec;
    Vec<T, kVec> val;
    if (row0 + r < rows) {
      val = load_vec<T, kVec>(src + (int64_t)(row0 + r) * row_stride + c);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) val.v[j] = from_float<T>(0.f);
    }
    store_vec<T, kVec>(dst + r * tile_ld<D>() + c, val);
  }
}

__device__ __forceinline__ bool key_visible(int kj, int qi, const uint8_t* mask, bool causal,
                                            int Sk, int shift) {
  return kj < Sk && (mask == nullptr || mask[kj] != 0) && (!causal || kj <= qi + shift);
}

template <typename T> using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// out[16][64] (fp32, ld kScoreLd) = a[16][D] * b[64][D]^T, both tiles with ld D + 8.
template <typename T, int D>
__device__ __forceinline__ void rows_times_tile_t(float* out, const T* a, const T* b) {
#pragma unroll
  for (int nt = 0; nt < kBlockN / 16; ++nt) {
    FragC acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
      FragA<T> fa;
      FragBT<T> fb;
      wmma::load_matrix_sync(fa, a + kk, tile_ld<D>());
      wmma::load_matrix_sync(fb, b + nt * 16 * tile_ld<D>() + kk, tile_ld<D>());
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + nt * 16, acc, kScoreLd, wmma::mem_row_major);
  }
}

template <typename T, int D> struct FwdSmem {
  static constexpr size_t tile = 64 * tile_ld<D>() * sizeof(T);
  static constexpr size_t q = 0, k = q + tile, v = k + tile;
  static constexpr size_t s = v + tile;                                  // fp32 [64][kScoreLd]
  static constexpr size_t p = s + 64 * kScoreLd * sizeof(float);         // T [64][kProbLd]
  static constexpr size_t o = p + 64 * kProbLd * sizeof(T);              // fp32 [64][D + 4]
  static constexpr size_t bytes = o + 64 * (D + 4) * sizeof(float);
};

// grid (ceil(Sq / 64), H, B), block 128 threads.
template <typename T, int D, bool kDropout>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const Params<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  using L = FwdSmem<T, D>;
  T* q_s = reinterpret_cast<T*>(smem + L::q);
  T* k_s = reinterpret_cast<T*>(smem + L::k);
  T* v_s = reinterpret_cast<T*>(smem + L::v);
  float* s_s = reinterpret_cast<float*>(smem + L::s);
  T* p_s = reinterpret_cast<T*>(smem + L::p);
  float* o_s = reinterpret_cast<float*>(smem + L::o);
  constexpr int kOLd = D + 4;

  const int m0 = blockIdx.x * kBlockM, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + lane / 2;  // the tile row this lane works on (with its neighbour)
  const int half = lane & 1;             // which half of the row's columns
  const int qi = m0 + row;
  const int shift = p.Sk - p.Sq;
  const float scale_log2 = p.scale * kLog2e;
  const T* q = p.q + b * p.q_st.b + h * p.q_st.h;
  const T* k = p.k + b * p.k_st.b + h * p.k_st.h;
  const T* v = p.v + b * p.v_st.b + h * p.v_st.h;
  const uint8_t* mask = p.mask ? p.mask + (int64_t)b * p.Sk : nullptr;

  load_tile<T, D>(q_s, q, p.q_st.s, m0, p.Sq);
  for (int i = threadIdx.x; i < 64 * kOLd; i += kThreads) o_s[i] = 0.f;
  // causal: the last query of this tile sees keys up to m0 + 63 + shift
  const int n_end = p.causal ? min(p.Sk, max(0, m0 + kBlockM + shift)) : p.Sk;
  float m_run = -INFINITY, l_run = 0.f;  // running max (log2 domain) and sum of this row
  float* s_row = s_s + row * kScoreLd;
  T* p_row = p_s + row * kProbLd;
  float* o_row = o_s + row * kOLd;
  __syncthreads();

  for (int n0 = 0; n0 < n_end; n0 += kBlockN) {
    load_tile<T, D>(k_s, k, p.k_st.s, n0, p.Sk);
    load_tile<T, D>(v_s, v, p.v_st.s, n0, p.Sk);
    __syncthreads();
    rows_times_tile_t<T, D>(s_s + warp * 16 * kScoreLd, q_s + warp * 16 * tile_ld<D>(), k_s);
    __syncwarp();

    float row_max = -INFINITY;
    for (int j = half * 32; j < half * 32 + 32; ++j) {
      const float sv = key_visible(n0 + j, qi, mask, p.causal, p.Sk, shift)
                           ? s_row[j] * scale_log2 : -INFINITY;
      s_row[j] = sv;
      row_max = fmaxf(row_max, sv);
    }
    row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 1));
    const float m_new = fmaxf(m_run, row_max);
    const bool none_yet = m_new == -INFINITY;  // no visible key so far: keep zeros, avoid NaN
    const float alpha = none_yet ? 1.f : exp2f(m_run - m_new);
    float row_sum = 0.f;
    for (int j = half * 32; j < half * 32 + 32; j += kRandStep<kDropout>) {
      Philox4 rnd;  // with dropout: the words of keys n0 + j .. + 3 (n0 + j is a multiple of 4)
      if constexpr (kDropout) rnd = attention_random(p.dropout, b, h, qi, n0 + j);
#pragma unroll
      for (int t = 0; t < kRandStep<kDropout>; ++t) {
        float pv = none_yet ? 0.f : exp2f(s_row[j + t] - m_new);
        row_sum += pv;  // the normaliser is that of the undropped probabilities
        if constexpr (kDropout) pv = rnd.x[t] >= p.dropout.threshold ? pv : 0.f;
        p_row[j + t] = from_float<T>(pv);
      }
    }
    row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
    l_run = alpha * l_run + row_sum;
    m_run = m_new;
    for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) o_row[d] *= alpha;
    __syncwarp();

    // O[warp rows] += P[warp rows] @ V
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) {
      FragC acc;
      float* o_tile = o_s + warp * 16 * kOLd + dt * 16;
      wmma::load_matrix_sync(acc, o_tile, kOLd, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBlockN; kk += 16) {
        FragA<T> fa;
        FragB<T> fb;
        wmma::load_matrix_sync(fa, p_s + warp * 16 * kProbLd + kk, kProbLd);
        wmma::load_matrix_sync(fb, v_s + kk * tile_ld<D>() + dt * 16, tile_ld<D>());
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(o_tile, acc, kOLd, wmma::mem_row_major);
    }
    __syncthreads();  // K/V tiles and score rows are reused next iteration
  }

  // normalise this row in shared memory, then write the warp's rows with consecutive lanes on
  // consecutive elements (coalesced)
  float inv_l = l_run > 0.f ? 1.f / l_run : 0.f;
  if constexpr (kDropout) inv_l *= p.dropout.keep_scale;
  for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) o_row[d] *= inv_l;
  if (half == 0 && qi < p.Sq)
    p.lse[((int64_t)b * p.H + h) * p.Sq + qi] =
        l_run > 0.f ? (m_run + log2f(l_run)) * kLn2 : INFINITY;
  __syncwarp();
  T* out = p.out + b * p.out_st.b + h * p.out_st.h;
  for (int i = lane; i < 16 * D; i += 32) {
    const int r = warp * 16 + i / D, d = i % D;
    if (m0 + r < p.Sq)
      out[(int64_t)(m0 + r) * p.out_st.s + d] = from_float<T>(o_s[r * kOLd + d]);
  }
}

// delta[b, h, i] = sum_d dout[b, i, h, d] * out[b, i, h, d]; one warp per row.
template <typename T>
__global__ void bwd_delta_kernel(const Params<T> p, int D) {
  const int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= (int64_t)p.B * p.H * p.Sq) return;
  const int qi = (int)(row % p.Sq);
  const int h = (int)((row / p.Sq) % p.H);
  const int b = (int)(row / ((int64_t)p.Sq * p.H));
  const T* o = p.out + b * p.out_st.b + (int64_t)qi * p.out_st.s + h * p.out_st.h;
  const T* g = p.dout + b * p.dout_st.b + (int64_t)qi * p.dout_st.s + h * p.dout_st.h;
  float s = 0.f;
  for (int d = lane; d < D; d += 32) s += to_float(o[d]) * to_float(g[d]);
  s = warp_sum(s);
  if (lane == 0) p.delta[row] = s;  // row = (b * H + h) * Sq + qi
}

template <typename T, int D> struct BwdSmem {
  static constexpr size_t tile = 64 * tile_ld<D>() * sizeof(T);
  static constexpr size_t a = 0, b = a + tile, c = b + tile, d = c + tile;  // four [64][D+8] tiles
  static constexpr size_t s = d + tile;                                  // fp32 [64][kScoreLd]
  static constexpr size_t dp = s + 64 * kScoreLd * sizeof(float);        // fp32 [64][kScoreLd]
  static constexpr size_t pt = dp + 64 * kScoreLd * sizeof(float);       // T [64][kProbLd]
  static constexpr size_t ds = pt + 64 * kProbLd * sizeof(T);            // T [64][kProbLd]
  static constexpr size_t stats = ds + 64 * kProbLd * sizeof(T);         // fp32 [2][64]
  static constexpr size_t bytes = stats + 2 * 64 * sizeof(float);
  // The epilogue stages fp32 [64][D + 4] results over the s and dp regions.
  static_assert(64 * (D + 4) <= 2 * 64 * kScoreLd, "epilogue staging must fit in s + dp");
};

// Write 16 fp32 accumulator tiles' rows (this warp's 16 rows, D columns) to a (B, S, H, D)
// tensor, times `mult`, rows past `rows` skipped. `stage` is this warp's [16][D + 4] scratch.
template <typename T, int D>
__device__ __forceinline__ void store_rows(FragC (&acc)[D / 16], float* stage, T* dst,
                                           int64_t row_stride, int row0, int rows, float mult) {
  constexpr int kLd = D + 4;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int dt = 0; dt < D / 16; ++dt)
    wmma::store_matrix_sync(stage + dt * 16, acc[dt], kLd, wmma::mem_row_major);
  __syncwarp();
  for (int i = lane; i < 16 * D; i += 32) {
    const int r = i / D, d = i % D;
    if (row0 + r < rows)
      dst[(int64_t)(row0 + r) * row_stride + d] = from_float<T>(stage[r * kLd + d] * mult);
  }
}

// dK, dV for one block of 64 keys, looping over the query blocks that can see it.
// grid (ceil(Sk / 64), H, B). Warp w accumulates dK, dV of keys n0 + 16w .. + 15 in fragments.
template <typename T, int D, bool kDropout>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_kernel(const Params<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  using L = BwdSmem<T, D>;
  T* k_s = reinterpret_cast<T*>(smem + L::a);
  T* v_s = reinterpret_cast<T*>(smem + L::b);
  T* q_s = reinterpret_cast<T*>(smem + L::c);
  T* do_s = reinterpret_cast<T*>(smem + L::d);
  float* st_s = reinterpret_cast<float*>(smem + L::s);   // S^T: [key][query]
  float* dpt_s = reinterpret_cast<float*>(smem + L::dp);  // dP^T
  T* pt_s = reinterpret_cast<T*>(smem + L::pt);          // P^T
  T* dst_s = reinterpret_cast<T*>(smem + L::ds);         // dS^T
  float* lse_s = reinterpret_cast<float*>(smem + L::stats);
  float* delta_s = lse_s + 64;

  const int n0 = blockIdx.x * kBlockN, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + lane / 2;  // key row of the tile this lane works on
  const int half = lane & 1;
  const int kj = n0 + row;
  const int shift = p.Sk - p.Sq;
  const float scale_log2 = p.scale * kLog2e;
  const int64_t bh = (int64_t)b * p.H + h;
  const uint8_t* mask = p.mask ? p.mask + (int64_t)b * p.Sk : nullptr;
  const bool key_real = kj < p.Sk && (mask == nullptr || mask[kj] != 0);

  load_tile<T, D>(k_s, p.k + b * p.k_st.b + h * p.k_st.h, p.k_st.s, n0, p.Sk);
  load_tile<T, D>(v_s, p.v + b * p.v_st.b + h * p.v_st.h, p.v_st.s, n0, p.Sk);
  FragC dk_acc[D / 16], dv_acc[D / 16];
#pragma unroll
  for (int dt = 0; dt < D / 16; ++dt) {
    wmma::fill_fragment(dk_acc[dt], 0.f);
    wmma::fill_fragment(dv_acc[dt], 0.f);
  }
  // causal: query i sees key n0 when i >= n0 - shift; start at that query's tile
  const int m_begin = p.causal ? max(0, n0 - shift) / kBlockM * kBlockM : 0;
  const T* q = p.q + b * p.q_st.b + h * p.q_st.h;
  const T* dout = p.dout + b * p.dout_st.b + h * p.dout_st.h;

  for (int m0 = m_begin; m0 < p.Sq; m0 += kBlockM) {
    __syncthreads();  // the previous iteration is done with the Q/dO tiles and stats
    load_tile<T, D>(q_s, q, p.q_st.s, m0, p.Sq);
    load_tile<T, D>(do_s, dout, p.dout_st.s, m0, p.Sq);
    for (int i = threadIdx.x; i < 64; i += kThreads) {
      const bool in = m0 + i < p.Sq;
      lse_s[i] = in ? p.lse[bh * p.Sq + m0 + i] * kLog2e : INFINITY;  // +inf: P = 0
      delta_s[i] = in ? p.delta[bh * p.Sq + m0 + i] : 0.f;
    }
    __syncthreads();
    rows_times_tile_t<T, D>(st_s + warp * 16 * kScoreLd, k_s + warp * 16 * tile_ld<D>(), q_s);
    rows_times_tile_t<T, D>(dpt_s + warp * 16 * kScoreLd, v_s + warp * 16 * tile_ld<D>(), do_s);
    __syncwarp();
    // With dropout, a lane's row is a key and its columns are queries, while one Philox call
    // covers four keys of one query. The four lanes holding keys 4g .. 4g + 3 (lane bits 1-2 =
    // kj & 3, same half) share the work: at columns j .. j + 3 the lane with kj & 3 == t draws
    // the words of query j + t, and in round r each lane takes column j + u from lane u.
    for (int j = half * 32; j < half * 32 + 32; j += kRandStep<kDropout>) {
      Philox4 mine;
      if constexpr (kDropout) mine = attention_random(p.dropout, b, h, m0 + j + (kj & 3), kj);
#pragma unroll
      for (int r = 0; r < kRandStep<kDropout>; ++r) {
        const int u = kDropout ? (kj - r) & 3 : 0;  // every u once over the four rounds
        const int jj = j + u, qi = m0 + jj;
        const bool visible = key_real && (!p.causal || kj <= qi + shift);
        const float pv =
            visible ? exp2f(st_s[row * kScoreLd + jj] * scale_log2 - lse_s[jj]) : 0.f;
        float dpv = dpt_s[row * kScoreLd + jj], p_used = pv;  // dP and P as dropout saw them
        if constexpr (kDropout) {
          // lane u sends word (u + r) & 3 = kj & 3 of this lane: (key kj, query qi)
          const uint32_t sent = philox_word(mine, (kj + r) & 3);
          const uint32_t word = __shfl_sync(0xffffffffu, sent, (lane & ~6) | (u << 1));
          const float keep = word >= p.dropout.threshold ? p.dropout.keep_scale : 0.f;
          dpv *= keep;
          p_used *= keep;
        }
        pt_s[row * kProbLd + jj] = from_float<T>(p_used);
        dst_s[row * kProbLd + jj] = from_float<T>(pv * (dpv - delta_s[jj]));
      }
    }
    __syncwarp();
    // dV[keys] += P^T dO, dK[keys] += dS^T Q (scale applied at the end)
#pragma unroll
    for (int kk = 0; kk < kBlockM; kk += 16) {
      FragA<T> fp, fds;
      wmma::load_matrix_sync(fp, pt_s + warp * 16 * kProbLd + kk, kProbLd);
      wmma::load_matrix_sync(fds, dst_s + warp * 16 * kProbLd + kk, kProbLd);
#pragma unroll
      for (int dt = 0; dt < D / 16; ++dt) {
        FragB<T> fdo, fq;
        wmma::load_matrix_sync(fdo, do_s + kk * tile_ld<D>() + dt * 16, tile_ld<D>());
        wmma::load_matrix_sync(fq, q_s + kk * tile_ld<D>() + dt * 16, tile_ld<D>());
        wmma::mma_sync(dv_acc[dt], fp, fdo, dv_acc[dt]);
        wmma::mma_sync(dk_acc[dt], fds, fq, dk_acc[dt]);
      }
    }
  }

  __syncthreads();  // staging below overlaps other warps' score rows
  float* stage = st_s + warp * 16 * (D + 4);
  store_rows<T, D>(dv_acc, stage, p.dv + b * p.dv_st.b + h * p.dv_st.h, p.dv_st.s,
                   n0 + warp * 16, p.Sk, 1.f);
  __syncwarp();
  store_rows<T, D>(dk_acc, stage, p.dk + b * p.dk_st.b + h * p.dk_st.h, p.dk_st.s,
                   n0 + warp * 16, p.Sk, p.scale);
}

// dQ for one block of 64 queries, looping over the key blocks it can see.
// grid (ceil(Sq / 64), H, B). Warp w accumulates dQ of queries m0 + 16w .. + 15 in fragments.
template <typename T, int D, bool kDropout>
__global__ void __launch_bounds__(kThreads) bwd_dq_kernel(const Params<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  using L = BwdSmem<T, D>;
  T* q_s = reinterpret_cast<T*>(smem + L::a);
  T* do_s = reinterpret_cast<T*>(smem + L::b);
  T* k_s = reinterpret_cast<T*>(smem + L::c);
  T* v_s = reinterpret_cast<T*>(smem + L::d);
  float* s_s = reinterpret_cast<float*>(smem + L::s);
  float* dp_s = reinterpret_cast<float*>(smem + L::dp);
  T* ds_s = reinterpret_cast<T*>(smem + L::ds);

  const int m0 = blockIdx.x * kBlockM, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + lane / 2;  // query row of the tile this lane works on
  const int half = lane & 1;
  const int qi = m0 + row;
  const int shift = p.Sk - p.Sq;
  const float scale_log2 = p.scale * kLog2e;
  const int64_t bh = (int64_t)b * p.H + h;
  const uint8_t* mask = p.mask ? p.mask + (int64_t)b * p.Sk : nullptr;
  const float lse2 = qi < p.Sq ? p.lse[bh * p.Sq + qi] * kLog2e : INFINITY;
  const float delta = qi < p.Sq ? p.delta[bh * p.Sq + qi] : 0.f;

  load_tile<T, D>(q_s, p.q + b * p.q_st.b + h * p.q_st.h, p.q_st.s, m0, p.Sq);
  load_tile<T, D>(do_s, p.dout + b * p.dout_st.b + h * p.dout_st.h, p.dout_st.s, m0, p.Sq);
  FragC dq_acc[D / 16];
#pragma unroll
  for (int dt = 0; dt < D / 16; ++dt) wmma::fill_fragment(dq_acc[dt], 0.f);
  const int n_end = p.causal ? min(p.Sk, max(0, m0 + kBlockM + shift)) : p.Sk;
  const T* k = p.k + b * p.k_st.b + h * p.k_st.h;
  const T* v = p.v + b * p.v_st.b + h * p.v_st.h;

  for (int n0 = 0; n0 < n_end; n0 += kBlockN) {
    __syncthreads();  // the previous iteration is done with the K/V tiles
    load_tile<T, D>(k_s, k, p.k_st.s, n0, p.Sk);
    load_tile<T, D>(v_s, v, p.v_st.s, n0, p.Sk);
    __syncthreads();
    rows_times_tile_t<T, D>(s_s + warp * 16 * kScoreLd, q_s + warp * 16 * tile_ld<D>(), k_s);
    rows_times_tile_t<T, D>(dp_s + warp * 16 * kScoreLd, do_s + warp * 16 * tile_ld<D>(), v_s);
    __syncwarp();
    for (int j = half * 32; j < half * 32 + 32; j += kRandStep<kDropout>) {
      Philox4 rnd;  // as in the forward
      if constexpr (kDropout) rnd = attention_random(p.dropout, b, h, qi, n0 + j);
#pragma unroll
      for (int t = 0; t < kRandStep<kDropout>; ++t) {
        const bool visible = key_visible(n0 + j + t, qi, mask, p.causal, p.Sk, shift);
        const float pv = visible ? exp2f(s_s[row * kScoreLd + j + t] * scale_log2 - lse2) : 0.f;
        float dpv = dp_s[row * kScoreLd + j + t];
        if constexpr (kDropout)
          dpv = rnd.x[t] >= p.dropout.threshold ? dpv * p.dropout.keep_scale : 0.f;
        ds_s[row * kProbLd + j + t] = from_float<T>(pv * (dpv - delta));
      }
    }
    __syncwarp();
    // dQ[queries] += dS K (scale applied at the end)
#pragma unroll
    for (int kk = 0; kk < kBlockN; kk += 16) {
      FragA<T> fds;
      wmma::load_matrix_sync(fds, ds_s + warp * 16 * kProbLd + kk, kProbLd);
#pragma unroll
      for (int dt = 0; dt < D / 16; ++dt) {
        FragB<T> fk;
        wmma::load_matrix_sync(fk, k_s + kk * tile_ld<D>() + dt * 16, tile_ld<D>());
        wmma::mma_sync(dq_acc[dt], fds, fk, dq_acc[dt]);
      }
    }
  }

  __syncthreads();  // staging below overlaps other warps' score rows
  store_rows<T, D>(dq_acc, s_s + warp * 16 * (D + 4), p.dq + b * p.dq_st.b + h * p.dq_st.h,
                   p.dq_st.s, m0 + warp * 16, p.Sq, p.scale);
}

}  // namespace attn
}  // namespace fastbert
