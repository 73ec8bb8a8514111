// Attention in fp32, forward and backward: FlashAttention-2's algorithm on the CUDA cores (FFMA),
// for callers that train or serve in fp32 and expect fp32 products. The fp16/bf16 kernels' mma.sync
// has no fp32 input form, and TF32 (10-bit mantissa) would break the op contract's "fp32 in,
// fp32-accurate out", so these kernels are SIMT.
//
// Same contract, masking, band skipping, varlen addressing, lse / delta layout and Philox dropout
// stream as kernels/attention_fwd.cuh and attention_bwd.cuh (attention_common.cuh), so a seed
// drops the same (query, key) pairs in every dtype. The delta kernel is shared; fp32's atomic dQ
// lands in dQ itself, pre-scaled, so it needs no convert pass.
//
// Thread tiling: 128 threads; each owns a small register tile of every product and reads its
// operands from shared memory as 16-byte vectors (LDS.128). Rows are D + 4 floats apart (an odd
// number of 16-byte chunks), so rows 1 or 2 apart start in different 4-bank groups. A thread's
// rows come in pairs (RowPairs: rows base, base + 1, base + split, base + split + 1): a pair holds
// both queries (or keys) of a Philox 2 x 2 block, and the 4 row groups of a warp, whose bases are
// 2 apart, read 4 different bank groups (4 apart they would share 2: a 2-way conflict).
// - forward / dQ kernel: 16R queries per block, thread (rg = tid / 8, cg = tid % 8) owns R query
//   rows from 2rg (pairs 16R / 2 apart); of S it holds key columns cg + 8j, and of O (or dQ) the
//   columns 4cg + 32c .. + 3. A row's 8 owners are adjacent lanes: its max and sum are 3 shuffles.
//   P (or dS) goes through shared memory between S = Q K^T and O += P V.
// - dK/dV kernel: a block of kBlockN keys, thread (kg, l) owns 4 keys (two pairs) and queries
//   l + kLanes i of each 32-query tile; dK and dV columns 4l + 4 kLanes c .. + 3.
#pragma once
#include "kernels/attention_common.cuh"

namespace fastbert {
namespace attn {

constexpr int kFp32Threads = 128;

// A thread's rows of a tile: row i = base + (i & 1) + (i >> 1) * split (base and split even).
struct RowPairs {
  int base, split;
  __device__ __forceinline__ int operator()(int i) const {
    return base + (i & 1) + (i >> 1) * split;
  }
};

// Rows [r0, r0 + kRows) of a sequence of `len` rows into a [kRows][D + 4] shared tile (cp.async,
// 16 bytes each); rows past the end are zero-filled, so they add nothing to any product.
template <int kRows, int D>
__device__ __forceinline__ void load_rows_fp32(float* dst, const float* src, int64_t stride,
                                               int r0, int len) {
  constexpr int kChunks = D / 4, kSteps = kRows * kChunks / kFp32Threads;
  static_assert(kRows * kChunks % kFp32Threads == 0, "whole steps: the loop unrolls");
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    const int i = threadIdx.x + k * kFp32Threads, r = i / kChunks, c = (i % kChunks) * 4;
    const bool valid = r0 + r < len;
    cp_async_16(dst + r * (D + 4) + c, valid ? src + (int64_t)(r0 + r) * stride + c : src, valid);
  }
}

__device__ __forceinline__ float4 lds4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}

__device__ __forceinline__ float lane_of(const float4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// acc[i][j] += dot(a row i, b row j) over D, rows of [.][D + 4] shared tiles: a's row i at
// (i & 1) * a1 + (i >> 1) * a2 floats from a, b's row j at (j & 1) * b1 + (j >> 1) * b2.
template <int R, int C, int D>
__device__ __forceinline__ void dot_rows(float (&acc)[R][C], const float* a, int a1, int a2,
                                         const float* b, int b1, int b2) {
#pragma unroll 2
  for (int d = 0; d < D; d += 4) {
    float4 av[R], bv[C];
#pragma unroll
    for (int i = 0; i < R; ++i) av[i] = lds4(a + (i & 1) * a1 + (i >> 1) * a2 + d);
#pragma unroll
    for (int j = 0; j < C; ++j) bv[j] = lds4(b + (j & 1) * b1 + (j >> 1) * b2 + d);
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < C; ++j)
        acc[i][j] = fmaf(av[i].x, bv[j].x, fmaf(av[i].y, bv[j].y,
                    fmaf(av[i].z, bv[j].z, fmaf(av[i].w, bv[j].w, acc[i][j]))));
  }
}

// acc[i][4c + e] += sum_n w[i][n] * x[n][c * x_step + e] for n < N: w's row i at (i & 1) * w1 +
// (i >> 1) * w2 floats from w (n contiguous), x a [N][kLd] tile.
template <int R, int C4, int N, int kLd>
__device__ __forceinline__ void accumulate_rows(float (&acc)[R][4 * C4], const float* w, int w1,
                                                int w2, const float* x, int x_step) {
#pragma unroll 2
  for (int n = 0; n < N; n += 4) {
    float4 wv[R];
#pragma unroll
    for (int i = 0; i < R; ++i) wv[i] = lds4(w + (i & 1) * w1 + (i >> 1) * w2 + n);
#pragma unroll
    for (int nn = 0; nn < 4; ++nn)
#pragma unroll
      for (int c = 0; c < C4; ++c) {
        const float4 xv = lds4(x + (n + nn) * kLd + c * x_step);
#pragma unroll
        for (int i = 0; i < R; ++i) {
          const float wi = lane_of(wv[i], nn);
          acc[i][4 * c] = fmaf(wi, xv.x, acc[i][4 * c]);
          acc[i][4 * c + 1] = fmaf(wi, xv.y, acc[i][4 * c + 1]);
          acc[i][4 * c + 2] = fmaf(wi, xv.z, acc[i][4 * c + 2]);
          acc[i][4 * c + 3] = fmaf(wi, xv.w, acc[i][4 * c + 3]);
        }
      }
  }
}

// Keep bits (bit i * kCols + j) of a row-tiled thread's scores: queries rows(i), i < R (R = 2: one
// pair, 4: two), x keys k0 + 8j, the lane of key k0 ^ 1 being lane ^ 1. Word (query parity qp,
// key parity kp) of a 2 x 2 Philox block is x[2 qp + kp]. At R = 4 the even-key lane draws the
// first query pair's block and the odd-key lane the second's; each keeps the words of its own
// key and sends the other's: 4 elements per call. At R = 2 each lane draws its own block.
template <int R, int kCols>
__device__ __forceinline__ uint32_t keep_bits_query_rows(const DropoutParams& d, int b, int h,
                                                         const RowPairs& rows, int k0) {
  static_assert(R == 2 || R == 4, "two or four query rows per thread");
  const bool odd = k0 & 1;
  const int drawn = R == 4 && odd ? rows(2) : rows(0);  // the query pair this lane draws
  uint32_t bits = 0;
#pragma unroll 1
  for (int j = 0; j < kCols; ++j) {
    const int key = k0 + 8 * j;
    const Philox4 r = philox4x32((uint32_t)key >> 1, (uint32_t)drawn >> 1, (uint32_t)h,
                                 (uint32_t)b, d.key0, d.key1);
    const uint32_t own0 = odd ? r.x[1] : r.x[0], own1 = odd ? r.x[3] : r.x[2];
    uint32_t w[4] = {own0, own1, 0u, 0u};
    if constexpr (R == 4) {
      const uint32_t got0 = __shfl_xor_sync(0xffffffffu, odd ? r.x[0] : r.x[1], 1);
      const uint32_t got1 = __shfl_xor_sync(0xffffffffu, odd ? r.x[2] : r.x[3], 1);
      w[0] = odd ? got0 : own0, w[1] = odd ? got1 : own1;
      w[2] = odd ? own0 : got0, w[3] = odd ? own1 : got1;
    }
#pragma unroll
    for (int i = 0; i < R; ++i) bits |= (uint32_t)(w[i] >= d.threshold) << (i * kCols + j);
  }
  return bits;
}

// Keep bits (bit 4i + e) of a dK/dV-tiled thread: queries q0 + kStep i (kStep even; the lane of
// query q0 ^ 1 is lane ^ 1) x keys keys(e), e < 4. The even-query lane draws the first key pair's
// block, the odd-query lane the second's, and they swap halves.
template <int kRows, int kStep>
__device__ __forceinline__ uint32_t keep_bits_key_rows(const DropoutParams& d, int b, int h,
                                                       int q0, const RowPairs& keys) {
  const bool odd = q0 & 1;
  const int drawn = odd ? keys(2) : keys(0);  // the key pair this lane draws
  uint32_t bits = 0;
#pragma unroll 1
  for (int i = 0; i < kRows; ++i) {
    const int query = q0 + kStep * i;
    const Philox4 r = philox4x32((uint32_t)drawn >> 1, (uint32_t)query >> 1, (uint32_t)h,
                                 (uint32_t)b, d.key0, d.key1);
    const uint32_t own0 = odd ? r.x[2] : r.x[0], own1 = odd ? r.x[3] : r.x[1];
    const uint32_t got0 = __shfl_xor_sync(0xffffffffu, odd ? r.x[0] : r.x[2], 1);
    const uint32_t got1 = __shfl_xor_sync(0xffffffffu, odd ? r.x[1] : r.x[3], 1);
    const uint32_t w[4] = {odd ? got0 : own0, odd ? got1 : own1, odd ? own0 : got0,
                           odd ? own1 : got1};
#pragma unroll
    for (int e = 0; e < 4; ++e) bits |= (uint32_t)(w[e] >= d.threshold) << (4 * i + e);
  }
  return bits;
}

// ---- forward --------------------------------------------------------------------------------

// Row tiling of the forward and the dQ kernel: R query rows per thread (16 row groups of 8
// lanes), kBlockN keys per tile.
template <int D, int R> struct Fp32RowTraits {
  static constexpr int kRows = R;
  static constexpr int kBlockM = 16 * R;              // queries per block
  static constexpr int kSplit = kBlockM / 2;          // between a thread's two query pairs
  static constexpr int kBlockN = D == 128 ? 32 : 64;  // keys per tile (registers, shared memory)
  static constexpr int kCols = kBlockN / 8;           // score columns per thread
  static constexpr int kOut = D / 8;                  // output columns per thread
  static constexpr int kLd = D + 4, kPLd = kBlockN + 4;
};

template <int D> struct Fp32FwdTraits : Fp32RowTraits<D, 4> {
  using B = Fp32RowTraits<D, 4>;
  // Q [kBlockM][kLd], K and V [kBlockN][kLd], P [kBlockM][kPLd]
  static constexpr size_t kSmemBytes =
      ((size_t)(B::kBlockM + 2 * B::kBlockN) * B::kLd + B::kBlockM * B::kPLd) * sizeof(float);
};

// The dQ kernel: 32 queries per block at D = 128, so that two blocks share an A100 SM.
template <int D> struct Fp32DqTraits : Fp32RowTraits<D, D == 128 ? 2 : 4> {
  using B = Fp32RowTraits<D, D == 128 ? 2 : 4>;
  // Q and dO [kBlockM][kLd], K [kBlockN][kLd], then V [kBlockN][kLd], whose space dS
  // [kBlockM][kPLd] takes once dP is computed
  static constexpr int kVFloats = B::kBlockN * B::kLd > B::kBlockM * B::kPLd
                                      ? B::kBlockN * B::kLd
                                      : B::kBlockM * B::kPLd;
  static constexpr size_t kSmemBytes =
      ((size_t)(2 * B::kBlockM + B::kBlockN) * B::kLd + kVFloats) * sizeof(float);
};

// What a query-tiled block (forward, dQ) reads of its sequence: the key and value rows, the key
// mask, its band and the key tiles [t_begin, t_end) that band reaches from queries m0 .. m0 +
// kBlockM - 1. `empty`: the block starts past the sequence's end (it returns at once).
template <int kBlockM, int kBlockN> struct QueryBlock {
  Seq seq;
  Band band;
  const float* k;
  const float* v;
  const uint8_t* mask;
  int m0, t_begin, t_end;
  bool empty;
  __device__ __forceinline__ QueryBlock(const Params<float>& p, int b, int h) {
    seq = sequence(p, b);
    m0 = blockIdx.x * kBlockM;
    empty = m0 >= seq.Sq;
    band = band_of(p, seq);
    k = row0(p.k, p.k_st, b, seq.k0, h);
    v = row0(p.v, p.v_st, b, seq.k0, h);
    mask = p.mask ? p.mask + (int64_t)b * p.Sk : nullptr;
    t_begin = band.key_begin(m0) / kBlockN;
    t_end = (band.key_end(min(m0 + kBlockM, seq.Sq) - 1, seq.Sk) + kBlockN - 1) / kBlockN;
  }
  // The K (or V) rows of key tile t into shared memory (cp.async, not waited for).
  template <int D>
  __device__ __forceinline__ void load_k(float* k_s, const Params<float>& p, int t) const {
    load_rows_fp32<kBlockN, D>(k_s, k, p.k_st.s, t * kBlockN, seq.Sk);
  }
  template <int D>
  __device__ __forceinline__ void load_v(float* v_s, const Params<float>& p, int t) const {
    load_rows_fp32<kBlockN, D>(v_s, v, p.v_st.s, t * kBlockN, seq.Sk);
  }
  // K and V of key tile t, landed for every thread, once no thread reads the last tile's (nor
  // what shares their space).
  template <int D>
  __device__ __forceinline__ void load_kv(float* k_s, float* v_s, const Params<float>& p,
                                          int t) const {
    __syncthreads();
    load_k<D>(k_s, p, t);
    load_v<D>(v_s, p, t);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
  }
};

// Whether every key of the tile n0 .. n0 + kBlockN - 1 is visible to each of a thread's R rows
// (no per-element masking needed).
template <int R, int kBlockN>
__device__ __forceinline__ bool tile_all_visible(uint64_t bits, const Band& band,
                                                 const RowPairs& rows, int n0) {
  constexpr uint64_t kFull = kBlockN == 64 ? ~0ull : (1ull << kBlockN) - 1;
  bool inside = (bits & kFull) == kFull && band.inside(rows(0), rows(1), n0, n0 + kBlockN - 1);
  if constexpr (R == 4) inside = inside && band.inside(rows(2), rows(3), n0, n0 + kBlockN - 1);
  return inside;
}

template <int D, bool kDropout>
__global__ void __launch_bounds__(kFp32Threads, 2) fwd_kernel_fp32(const Params<float> p) {
  using Tr = Fp32FwdTraits<D>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kLd = Tr::kLd, kPLd = Tr::kPLd;
  constexpr int kCols = Tr::kCols, kOut = Tr::kOut, kSplit = Tr::kSplit;
  extern __shared__ __align__(128) unsigned char smem[];
  float* q_s = reinterpret_cast<float*>(smem);
  float* k_s = q_s + kBlockM * kLd;
  float* v_s = k_s + kBlockN * kLd;
  float* p_s = v_s + kBlockN * kLd;

  const int h = blockIdx.y, b = blockIdx.z;
  const QueryBlock<kBlockM, kBlockN> blk(p, b, h);
  if (blk.empty) return;
  const Seq& seq = blk.seq;
  const Band& band = blk.band;
  const int m0 = blk.m0, r0 = (threadIdx.x >> 3) * 2, cg = threadIdx.x & 7;
  const RowPairs rows{m0 + r0, kSplit};  // this thread's queries rows(0 .. 3)
  // K and V tiles stream through shared memory in cp.async groups of their own: the next tile's
  // K loads while this tile's softmax and P V run, its V while the next S = Q K^T runs.
  if (blk.t_begin < blk.t_end) {
    load_rows_fp32<kBlockM, D>(q_s, row0(p.q, p.q_st, b, seq.q0, h), p.q_st.s, m0, seq.Sq);
    blk.template load_k<D>(k_s, p, blk.t_begin);
    cp_async_commit();
    blk.template load_v<D>(v_s, p, blk.t_begin);
    cp_async_commit();
  }

  float o[4][kOut], m[4], l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY, l[i] = 0.f;
#pragma unroll
    for (int f = 0; f < kOut; ++f) o[i][f] = 0.f;
  }
  for (int t = blk.t_begin; t < blk.t_end; ++t) {
    const int n0 = t * kBlockN;
    const bool more = t + 1 < blk.t_end;
    cp_async_wait_group<1>();  // Q and this tile's K have landed (its V may still fly) ...
    __syncthreads();           // ... for every thread
    const uint64_t bits = key_bits(blk.mask, n0, seq.Sk);
    uint32_t keep = ~0u;
    if constexpr (kDropout) keep = keep_bits_query_rows<4, kCols>(p.dropout, b, h, rows, n0 + cg);
    float s[4][kCols];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) s[i][j] = 0.f;
    dot_rows<4, kCols, D>(s, q_s + r0 * kLd, kLd, kSplit * kLd, k_s + cg * kLd, 8 * kLd,
                          16 * kLd);
    __syncthreads();  // every thread has read K: the next tile's may come
    if (more) blk.template load_k<D>(k_s, p, t + 1);
    cp_async_commit();
    const bool all_visible = tile_all_visible<4, kBlockN>(bits, band, rows, n0);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float mx = m[i];
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int col = cg + 8 * j;
        s[i][j] *= p.scale_log2;
        if (!all_visible && !(((bits >> col) & 1) && band.has(rows(i), n0 + col)))
          s[i][j] = -INFINITY;
        mx = fmaxf(mx, s[i][j]);
      }
#pragma unroll
      for (int x = 1; x <= 4; x <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
      // exp2 base: 0 while the row has seen nothing (its P is then exp2(-inf) = 0, never NaN)
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(m[i] - base);
      m[i] = mx;
      l[i] *= alpha;
#pragma unroll
      for (int f = 0; f < kOut; ++f) o[i][f] *= alpha;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        float pv = exp2f(s[i][j] - base);
        l[i] += pv;  // the normaliser is that of the undropped probabilities
        if constexpr (kDropout) pv = (keep >> (i * kCols + j)) & 1 ? pv : 0.f;
        p_s[(rows(i) - m0) * kPLd + cg + 8 * j] = pv;
      }
    }
    cp_async_wait_group<1>();  // this tile's V has landed (the next K may still fly) ...
    __syncthreads();           // ... for every thread, and P is written
    accumulate_rows<4, kOut / 4, kBlockN, kLd>(o, p_s + r0 * kPLd, kPLd, kSplit * kPLd,
                                               v_s + 4 * cg, 32);
    __syncthreads();  // every thread has read V and P
    if (more) blk.template load_v<D>(v_s, p, t + 1);
    cp_async_commit();
  }

  const float keep_scale = kDropout ? p.dropout.keep_scale : 1.f;
  float* lse = p.lse + b * p.lse_b + h * p.lse_h + seq.q0;
  float* out = row0(p.out, p.out_st, b, seq.q0, h) + 4 * cg;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int x = 1; x <= 4; x <<= 1) l[i] += __shfl_xor_sync(0xffffffffu, l[i], x);
    const int row = rows(i);
    if (row >= seq.Sq) continue;
    if (cg == 0) lse[row] = l[i] > 0.f ? (m[i] + log2f(l[i])) * kLn2 : INFINITY;
    const float mult = l[i] > 0.f ? keep_scale / l[i] : 0.f;
#pragma unroll
    for (int c = 0; c < kOut / 4; ++c)
      *reinterpret_cast<float4*>(out + (int64_t)row * p.out_st.s + 32 * c) =
          make_float4(o[i][4 * c] * mult, o[i][4 * c + 1] * mult, o[i][4 * c + 2] * mult,
                      o[i][4 * c + 3] * mult);
  }
}

// ---- backward: dK, dV (and atomic dQ) -----------------------------------------------------------

template <int D> struct Fp32BwdTraits {
  static constexpr int kBlockN = D == 128 ? 32 : 64;     // keys per block, 4 per key group
  static constexpr int kBlockM = 32;                      // queries per tile
  static constexpr int kLanes = kFp32Threads / (kBlockN / 4);  // threads sharing a key group
  static constexpr int kRows = kBlockM / kLanes;          // queries per thread in S and dP
  static constexpr int kAcc = D / kLanes;                 // dK / dV columns per thread
  // key group kg's keys: RowPairs{kKeyBase * kg, kKeySplit}. With 8 lanes a group, a warp's 4
  // groups start 2 keys apart (pairs kBlockN / 2 apart); with 16, its 2 groups 4 apart
  static constexpr int kKeyBase = kLanes == 8 ? 2 : 4, kKeySplit = kLanes == 8 ? kBlockN / 2 : 2;
  static constexpr int kLd = D + 4, kTLd = kBlockM + 4;
  // the atomic dQ product: kBlockM x D, thread (qg, ch) owns kDqRows rows x columns 4ch .. + 3
  static constexpr int kDqChunks = D / 4, kDqRows = kBlockM * kDqChunks / kFp32Threads;
  // K, V [kBlockN][kLd]; Q, dO [kBlockM][kLd]; lse, delta [kBlockM]; P^T, dS^T [kBlockN][kTLd]
  static constexpr size_t kSmemBytes =
      ((size_t)(2 * kBlockN + 2 * kBlockM) * kLd + 2 * kBlockM + 2 * kBlockN * kTLd) *
      sizeof(float);
  static_assert(kAcc % 4 == 0 && kDqRows >= 1 && (kLanes == 8 || kLanes == 16), "tiling");
};

// dQ's atomics land in dq itself (fp32: dq_accum == dq, zeroed by delta_kernel), pre-scaled.
template <int D, bool kDropout>
__global__ void __launch_bounds__(kFp32Threads, 2) dkdv_kernel_fp32(const Params<float> p) {
  using Tr = Fp32BwdTraits<D>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kLanes = Tr::kLanes;
  constexpr int kRows = Tr::kRows, kAcc = Tr::kAcc, kLd = Tr::kLd, kTLd = Tr::kTLd;
  extern __shared__ __align__(128) unsigned char smem[];
  float* k_s = reinterpret_cast<float*>(smem);
  float* v_s = k_s + kBlockN * kLd;
  float* q_s = v_s + kBlockN * kLd;
  float* do_s = q_s + kBlockM * kLd;
  float* lse_s = do_s + kBlockM * kLd;
  float* delta_s = lse_s + kBlockM;
  float* pt_s = delta_s + kBlockM;  // P^T as dropout saw it
  float* dst_s = pt_s + kBlockN * kTLd;  // dS^T

  const int h = blockIdx.y, b = blockIdx.z;
  const Seq seq = sequence(p, b);
  const int n0 = blockIdx.x * kBlockN;
  if (n0 >= seq.Sk) return;
  const int kg = threadIdx.x / kLanes, ln = threadIdx.x % kLanes;
  const RowPairs tile_keys{Tr::kKeyBase * kg, Tr::kKeySplit};  // in the block's key tile
  const RowPairs keys{n0 + tile_keys.base, Tr::kKeySplit};     // in the sequence
  const Band band = band_of(p, seq);
  const uint8_t* mask = p.mask ? p.mask + (int64_t)b * p.Sk : nullptr;
  bool real[4];
#pragma unroll
  for (int e = 0; e < 4; ++e)
    real[e] = keys(e) < seq.Sk && (mask == nullptr || mask[keys(e)] != 0);
  const float* q = row0(p.q, p.q_st, b, seq.q0, h);
  const float* dout = row0(p.dout, p.dout_st, b, seq.q0, h);
  const float* lse = p.lse + b * p.lse_b + h * p.lse_h + seq.q0;
  const float* delta = p.delta + b * p.lse_b + h * p.lse_h + seq.q0;
  const int m_begin = band.query_begin(n0) / kBlockM * kBlockM;
  const int m_end = band.query_end(min(n0 + kBlockN, seq.Sk) - 1, seq.Sq);

  load_rows_fp32<kBlockN, D>(k_s, row0(p.k, p.k_st, b, seq.k0, h), p.k_st.s, n0, seq.Sk);
  load_rows_fp32<kBlockN, D>(v_s, row0(p.v, p.v_st, b, seq.k0, h), p.v_st.s, n0, seq.Sk);
  cp_async_commit();
  cp_async_wait_all();

  float dk[4][kAcc], dv[4][kAcc];
#pragma unroll
  for (int e = 0; e < 4; ++e)
#pragma unroll
    for (int f = 0; f < kAcc; ++f) dk[e][f] = dv[e][f] = 0.f;

  for (int m0 = m_begin; m0 < m_end; m0 += kBlockM) {
    __syncthreads();  // nobody still reads the previous tile
    load_rows_fp32<kBlockM, D>(q_s, q, p.q_st.s, m0, seq.Sq);
    load_rows_fp32<kBlockM, D>(do_s, dout, p.dout_st.s, m0, seq.Sq);
    for (int i = threadIdx.x; i < kBlockM; i += kFp32Threads) {
      const bool valid = m0 + i < seq.Sq;
      cp_async_4(lse_s + i, valid ? lse + m0 + i : lse, valid);
      cp_async_4(delta_s + i, valid ? delta + m0 + i : delta, valid);
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    uint32_t keep = ~0u;
    if constexpr (kDropout)
      keep = keep_bits_key_rows<kRows, kLanes>(p.dropout, b, h, m0 + ln, keys);
    float s[kRows][4], dp[kRows][4];
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
    const int key_row = tile_keys.base * kLd, key_split = Tr::kKeySplit * kLd;
    dot_rows<kRows, 4, D>(s, q_s + ln * kLd, kLanes * kLd, 2 * kLanes * kLd, k_s + key_row, kLd,
                          key_split);
    dot_rows<kRows, 4, D>(dp, do_s + ln * kLd, kLanes * kLd, 2 * kLanes * kLd, v_s + key_row,
                          kLd, key_split);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = ln + kLanes * i;
      const float lse2 = lse_s[r] * kLog2e, dl = delta_s[r];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool visible = real[e] && m0 + r < seq.Sq && band.has(m0 + r, keys(e));
        const float pv = visible ? exp2f(s[i][e] * p.scale_log2 - lse2) : 0.f;
        float dpv = dp[i][e], p_used = pv;
        if constexpr (kDropout) {
          const float kept = (keep >> (4 * i + e)) & 1 ? p.dropout.keep_scale : 0.f;
          dpv *= kept;
          p_used *= kept;
        }
        pt_s[tile_keys(e) * kTLd + r] = p_used;
        dst_s[tile_keys(e) * kTLd + r] = pv * (dpv - dl);
      }
    }
    __syncthreads();
    // dV += P^T dO, dK += dS^T Q (the scale is applied at the end)
    const int t_row = tile_keys.base * kTLd, t_split = Tr::kKeySplit * kTLd;
    accumulate_rows<4, kAcc / 4, kBlockM, kLd>(dv, pt_s + t_row, kTLd, t_split, do_s + 4 * ln,
                                               4 * kLanes);
    accumulate_rows<4, kAcc / 4, kBlockM, kLd>(dk, dst_s + t_row, kTLd, t_split, q_s + 4 * ln,
                                               4 * kLanes);
    if (p.dq_accum != nullptr) {  // dQ += scale * dS K over this block's keys, into dq
      constexpr int kDqRows = Tr::kDqRows;
      const int qr = threadIdx.x / Tr::kDqChunks * kDqRows, col = threadIdx.x % Tr::kDqChunks * 4;
      float acc[kDqRows][4];
#pragma unroll
      for (int i = 0; i < kDqRows; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll 4
      for (int n = 0; n < kBlockN; ++n) {
        const float4 kv = lds4(k_s + n * kLd + col);
#pragma unroll
        for (int i = 0; i < kDqRows; ++i) {
          const float w = dst_s[n * kTLd + qr + i];
          acc[i][0] = fmaf(w, kv.x, acc[i][0]);
          acc[i][1] = fmaf(w, kv.y, acc[i][1]);
          acc[i][2] = fmaf(w, kv.z, acc[i][2]);
          acc[i][3] = fmaf(w, kv.w, acc[i][3]);
        }
      }
      float* dst = row0(p.dq_accum, p.acc_st, b, seq.q0, h) + col;
#pragma unroll
      for (int i = 0; i < kDqRows; ++i) {
        if (m0 + qr + i >= seq.Sq) continue;
#pragma unroll
        for (int x = 0; x < 4; ++x)
          atomicAdd(dst + (int64_t)(m0 + qr + i) * p.acc_st.s + x, acc[i][x] * p.scale);
      }
    }
  }

  float* dk_out = row0(p.dk, p.dk_st, b, seq.k0, h) + 4 * ln;
  float* dv_out = row0(p.dv, p.dv_st, b, seq.k0, h) + 4 * ln;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int key = keys(e);
    if (key >= seq.Sk) continue;
#pragma unroll
    for (int c = 0; c < kAcc / 4; ++c) {
      *reinterpret_cast<float4*>(dk_out + (int64_t)key * p.dk_st.s + 4 * kLanes * c) =
          make_float4(dk[e][4 * c] * p.scale, dk[e][4 * c + 1] * p.scale,
                      dk[e][4 * c + 2] * p.scale, dk[e][4 * c + 3] * p.scale);
      *reinterpret_cast<float4*>(dv_out + (int64_t)key * p.dv_st.s + 4 * kLanes * c) =
          make_float4(dv[e][4 * c], dv[e][4 * c + 1], dv[e][4 * c + 2], dv[e][4 * c + 3]);
    }
  }
}

// ---- backward: dQ without atomics (deterministic) ---------------------------------------------

template <int D, bool kDropout>
__global__ void __launch_bounds__(kFp32Threads, 2) dq_kernel_fp32(const Params<float> p) {
  using Tr = Fp32DqTraits<D>;
  constexpr int R = Tr::kRows, kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN;
  constexpr int kLd = Tr::kLd, kPLd = Tr::kPLd, kCols = Tr::kCols, kOut = Tr::kOut;
  constexpr int kSplit = Tr::kSplit;
  extern __shared__ __align__(128) unsigned char smem[];
  float* q_s = reinterpret_cast<float*>(smem);
  float* do_s = q_s + kBlockM * kLd;
  float* k_s = do_s + kBlockM * kLd;
  float* v_s = k_s + kBlockN * kLd;
  float* ds_s = v_s;  // [kBlockM][kPLd], once nobody reads V

  const int h = blockIdx.y, b = blockIdx.z;
  const QueryBlock<kBlockM, kBlockN> blk(p, b, h);
  if (blk.empty) return;
  const Seq& seq = blk.seq;
  const Band& band = blk.band;
  const int m0 = blk.m0, r0 = (threadIdx.x >> 3) * 2, cg = threadIdx.x & 7;
  const RowPairs rows{m0 + r0, kSplit};  // this thread's queries rows(0 .. R - 1)
  if (blk.t_begin < blk.t_end) {  // (the first tile's wait covers them)
    load_rows_fp32<kBlockM, D>(q_s, row0(p.q, p.q_st, b, seq.q0, h), p.q_st.s, m0, seq.Sq);
    load_rows_fp32<kBlockM, D>(do_s, row0(p.dout, p.dout_st, b, seq.q0, h), p.dout_st.s, m0,
                               seq.Sq);
  }
  float lse2[R], dl[R];
  const int64_t stat0 = b * p.lse_b + h * p.lse_h + seq.q0;
#pragma unroll
  for (int i = 0; i < R; ++i) {  // rows past the end: lse = +inf, so P = 0
    const int row = rows(i);
    lse2[i] = row < seq.Sq ? p.lse[stat0 + row] * kLog2e : INFINITY;
    dl[i] = row < seq.Sq ? p.delta[stat0 + row] : 0.f;
  }

  float dq[R][kOut];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int f = 0; f < kOut; ++f) dq[i][f] = 0.f;
  for (int t = blk.t_begin; t < blk.t_end; ++t) {
    const int n0 = t * kBlockN;
    blk.template load_kv<D>(k_s, v_s, p, t);  // (dS, in V's space, is read by then too)
    const uint64_t bits = key_bits(blk.mask, n0, seq.Sk);
    uint32_t keep = ~0u;
    if constexpr (kDropout) keep = keep_bits_query_rows<R, kCols>(p.dropout, b, h, rows, n0 + cg);
    float s[R][kCols], dp[R][kCols];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) s[i][j] = dp[i][j] = 0.f;
    dot_rows<R, kCols, D>(s, q_s + r0 * kLd, kLd, kSplit * kLd, k_s + cg * kLd, 8 * kLd,
                          16 * kLd);
    dot_rows<R, kCols, D>(dp, do_s + r0 * kLd, kLd, kSplit * kLd, v_s + cg * kLd, 8 * kLd,
                          16 * kLd);
    __syncthreads();  // V is read: dS takes its place
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int col = cg + 8 * j;
        const bool visible = ((bits >> col) & 1) && band.has(rows(i), n0 + col);
        const float pv = visible ? exp2f(s[i][j] * p.scale_log2 - lse2[i]) : 0.f;
        float dpv = dp[i][j];
        if constexpr (kDropout)
          dpv = (keep >> (i * kCols + j)) & 1 ? dpv * p.dropout.keep_scale : 0.f;
        ds_s[(rows(i) - m0) * kPLd + col] = pv * (dpv - dl[i]);
      }
    __syncthreads();
    accumulate_rows<R, kOut / 4, kBlockN, kLd>(dq, ds_s + r0 * kPLd, kPLd, kSplit * kPLd,
                                               k_s + 4 * cg, 32);
  }

  float* out = row0(p.dq, p.dq_st, b, seq.q0, h) + 4 * cg;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int row = rows(i);
    if (row >= seq.Sq) continue;
#pragma unroll
    for (int c = 0; c < kOut / 4; ++c)
      *reinterpret_cast<float4*>(out + (int64_t)row * p.dq_st.s + 32 * c) =
          make_float4(dq[i][4 * c] * p.scale, dq[i][4 * c + 1] * p.scale,
                      dq[i][4 * c + 2] * p.scale, dq[i][4 * c + 3] * p.scale);
  }
}

}  // namespace attn
}  // namespace fastbert
