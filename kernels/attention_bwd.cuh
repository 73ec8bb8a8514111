// Attention backward, FlashAttention-2 style.
//
// 1. delta_kernel: delta = rowsum(dO * O) per query (and zeroes the fp32 dQ accumulator).
// 2. dkdv_kernel: one block per (64-key block, head, sequence), 4 warps of 16 keys each; dK and
//    dV stay in registers while the block walks the query tiles whose band reaches its keys (Q, dO,
//    lse, delta double-buffered by cp.async). Per tile and warp, five products: S^T = K Q^T and
//    dP^T = V dO^T (C fragments), P^T and dS^T = P^T (dP^T - delta) element-wise (exp and
//    Philox once), dV += P^T dO and dK += dS^T Q with the C fragments re-packed as A operands,
//    and, when dq_accum is set, dQ += dS K through dS^T in shared memory, added to the fp32
//    accumulator with atomics (3. dq_convert_kernel scales and converts it).
// 4. dq_kernel (deterministic = True): dQ per 64-query tile without atomics, recomputing S and dP
//    (the dK/dV kernel then skips its dQ product).
// Dropout: dV uses the dropped P (times 1 / (1 - p)); dP is masked and scaled the same way
// before dS = P (dP - delta).
#pragma once
#include "kernels/attention_common.cuh"

namespace fastbert {
namespace attn {

// ---- 1. delta ------------------------------------------------------------------------------

constexpr int kDeltaThreads = 128;

// Rows per delta_kernel block: kVec = 16 / sizeof(T) elements per lane (16 bytes), D / kVec lanes
// per row.
template <typename T, int D> struct DeltaTraits {
  static constexpr int kVec = 16 / sizeof(T), kLanes = D / kVec, kRows = kDeltaThreads / kLanes;
};

// grid (cdiv(Sq, kRows), H, B).
template <typename T, int D> __global__ void __launch_bounds__(kDeltaThreads)
delta_kernel(const Params<T> p) {
  using Tr = DeltaTraits<T, D>;
  constexpr int kVec = Tr::kVec, kLanes = Tr::kLanes, kRows = Tr::kRows;
  const int h = blockIdx.y, b = blockIdx.z;
  const Seq seq = sequence(p, b);
  if ((int)blockIdx.x * kRows >= seq.Sq) return;
  const int row = blockIdx.x * kRows + threadIdx.x / kLanes, col = (threadIdx.x % kLanes) * kVec;
  float sum = 0.f;
  if (row < seq.Sq) {
    const Vec<T, kVec> o = load_vec<T, kVec>(row0(p.out, p.out_st, b, seq.q0, h) +
                                             (int64_t)row * p.out_st.s + col);
    const Vec<T, kVec> d = load_vec<T, kVec>(row0(p.dout, p.dout_st, b, seq.q0, h) +
                                             (int64_t)row * p.dout_st.s + col);
#pragma unroll
    for (int i = 0; i < kVec; ++i) sum += to_float(o.v[i]) * to_float(d.v[i]);
    if (p.dq_accum != nullptr) {
      float* acc = row0(p.dq_accum, p.acc_st, b, seq.q0, h) + (int64_t)row * p.acc_st.s + col;
#pragma unroll
      for (int i = 0; i < kVec / 4; ++i)
        reinterpret_cast<float4*>(acc)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
#pragma unroll
  for (int x = 1; x < kLanes; x <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, x);
  if (row < seq.Sq && col == 0) p.delta[b * p.lse_b + h * p.lse_h + seq.q0 + row] = sum;
}

// ---- 2. dK, dV (and atomic dQ) -------------------------------------------------------------

template <int D> struct BwdTraits {
  static constexpr int kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kBlockN = 64;                  // keys per block, 16 per warp
  static constexpr int kBlockM = D == 128 ? 16 : 64;  // queries per tile (registers, shared)
  static constexpr bool kKVInRegs = D <= 32;          // K, V A-fragments kept in registers
  static constexpr int kLd = D + 8, kDsLd = kBlockM + 8;  // padded rows: ldmatrix conflict-free
  // dQ product: warps tile the kBlockM x D output as kRowGroups x kColGroups
  static constexpr int kRowGroups = kBlockM / 16, kColGroups = kWarps / kRowGroups;
  static constexpr int kWarpCols = D / kColGroups;
  // K [64][kLd], V [64][kLd], two stages of (Q [kBlockM][kLd], dO [kBlockM][kLd],
  // lse [kBlockM], delta [kBlockM]), dS^T [64][kDsLd]
  static constexpr int kStageBytes = 2 * kBlockM * kLd * 2 + 2 * kBlockM * 4;
  static constexpr int kStage0 = 2 * kBlockN * kLd * 2;
  static constexpr int kDs = kStage0 + 2 * kStageBytes;
  static constexpr size_t kSmemBytes = (size_t)kDs + kBlockN * kDsLd * 2;
};

template <typename T, int D, bool kDropout>
__global__ void __launch_bounds__(BwdTraits<D>::kThreads, 2) dkdv_kernel(const Params<T> p) {
  using Tr = BwdTraits<D>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kLd = Tr::kLd, kDsLd = Tr::kDsLd;
  constexpr int kNF = kBlockM / 8;  // query fragments per tile
  extern __shared__ __align__(128) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + kBlockN * kLd;
  T* ds_s = reinterpret_cast<T*>(smem + Tr::kDs);
  auto q_tile = [&](int stage) {  // Q, then dO, then lse and delta of one stage
    return reinterpret_cast<T*>(smem + Tr::kStage0 + stage * Tr::kStageBytes);
  };
  auto stats = [&](int stage) {
    return reinterpret_cast<float*>(q_tile(stage) + 2 * kBlockM * kLd);
  };

  const int h = blockIdx.y, b = blockIdx.z;
  const Seq seq = sequence(p, b);
  const int n0 = blockIdx.x * kBlockN;
  if (n0 >= seq.Sk) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, c = lane & 3;
  const Band band = band_of(p, seq);
  const int warp_first = n0 + warp * 16;
  const int key_lo = warp_first + (lane >> 2);  // this lane's keys: key_lo and key_lo + 8
  const uint8_t* mask = p.mask ? p.mask + (int64_t)b * p.Sk : nullptr;
  const bool real_lo = key_lo < seq.Sk && (mask == nullptr || mask[key_lo] != 0);
  const bool real_hi = key_lo + 8 < seq.Sk && (mask == nullptr || mask[key_lo + 8] != 0);
  const bool warp_keys_real = __all_sync(0xffffffffu, real_lo && real_hi);
  const T* q = row0(p.q, p.q_st, b, seq.q0, h);
  const T* dout = row0(p.dout, p.dout_st, b, seq.q0, h);
  const float* lse = p.lse + b * p.lse_b + h * p.lse_h + seq.q0;
  const float* delta = p.delta + b * p.lse_b + h * p.lse_h + seq.q0;
  // the query tiles from m_begin on that hold every query whose band reaches the block's keys
  const int m_begin = band.query_begin(n0) / kBlockM * kBlockM;
  const int m_end = band.query_end(min(n0 + kBlockN, seq.Sk) - 1, seq.Sq);
  const int m_tiles = m_begin < m_end ? (m_end - m_begin + kBlockM - 1) / kBlockM : 0;

  auto load_q = [&](int m0, int stage) {
    T* dst = q_tile(stage);
    load_rows_async<kBlockM, D, Tr::kThreads>(dst, q, p.q_st.s, m0, seq.Sq);
    load_rows_async<kBlockM, D, Tr::kThreads>(dst + kBlockM * kLd, dout, p.dout_st.s, m0, seq.Sq);
    float* st = stats(stage);
    for (int i = threadIdx.x; i < kBlockM; i += Tr::kThreads) {
      const bool valid = m0 + i < seq.Sq;  // zeros past the end: those rows have Q = dO = 0
      cp_async_4(st + i, valid ? lse + m0 + i : lse, valid);
      cp_async_4(st + kBlockM + i, valid ? delta + m0 + i : delta, valid);
    }
  };
  load_rows_async<kBlockN, D, Tr::kThreads>(k_s, row0(p.k, p.k_st, b, seq.k0, h), p.k_st.s, n0,
                                            seq.Sk);
  load_rows_async<kBlockN, D, Tr::kThreads>(v_s, row0(p.v, p.v_st, b, seq.k0, h), p.v_st.s, n0,
                                            seq.Sk);
  if (m_tiles > 0) load_q(m_begin, 0);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  uint32_t k_frag[Tr::kKVInRegs ? D / 16 : 1][4], v_frag[Tr::kKVInRegs ? D / 16 : 1][4];
  if constexpr (Tr::kKVInRegs) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      ldmatrix_x4(k_frag[kk], smem_addr(k_s + a_frag_offset(lane, warp * 16, kk * 16, kLd)));
      ldmatrix_x4(v_frag[kk], smem_addr(v_s + a_frag_offset(lane, warp * 16, kk * 16, kLd)));
    }
  }
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int f = 0; f < D / 8; ++f)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[f][e] = dv[f][e] = 0.f;

  for (int it = 0; it < m_tiles; ++it) {
    const int m0 = m_begin + it * kBlockM;
    if (it + 1 < m_tiles) load_q(m0 + kBlockM, (it + 1) & 1);
    cp_async_commit();
    const T* q_s = q_tile(it & 1);
    const T* do_s = q_s + kBlockM * kLd;
    const float* lse_s = stats(it & 1);
    const float* delta_s = lse_s + kBlockM;

    // drawn before S exists: fewer live registers while Philox runs
    uint32_t keep_bits = ~0u;
    if constexpr (kDropout)
      keep_bits = dropout_keep_bits<false, kNF>(p.dropout, b, h, key_lo, m0 + 2 * c);
    float s[kNF][4], dp[kNF][4];
#pragma unroll
    for (int f = 0; f < kNF; ++f)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[f][e] = dp[f][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      if constexpr (Tr::kKVInRegs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) ak[i] = k_frag[kk][i], av[i] = v_frag[kk][i];
      } else {
        ldmatrix_x4(ak, smem_addr(k_s + a_frag_offset(lane, warp * 16, kk * 16, kLd)));
        ldmatrix_x4(av, smem_addr(v_s + a_frag_offset(lane, warp * 16, kk * 16, kLd)));
      }
#pragma unroll
      for (int np = 0; np < kNF / 2; ++np) {
        uint32_t bq[4], bd[4];
        ldmatrix_x4(bq, smem_addr(q_s + bt_frag_offset(lane, np * 16, kk * 16, kLd)));
        ldmatrix_x4(bd, smem_addr(do_s + bt_frag_offset(lane, np * 16, kk * 16, kLd)));
        mma_16816<T>(s[2 * np], ak, bq[0], bq[1]);
        mma_16816<T>(s[2 * np + 1], ak, bq[2], bq[3]);
        mma_16816<T>(dp[2 * np], av, bd[0], bd[1]);
        mma_16816<T>(dp[2 * np + 1], av, bd[2], bd[3]);
      }
    }
    // s <- P^T as dropout saw it, dp <- dS^T
    const bool all_visible =
        warp_keys_real && band.inside(m0, m0 + kBlockM - 1, warp_first, warp_first + 15);
#pragma unroll
    for (int f = 0; f < kNF; ++f) {
      const int col = f * 8 + 2 * c;  // this lane's queries m0 + col, m0 + col + 1
      const float lse2[2] = {lse_s[col] * kLog2e, lse_s[col + 1] * kLog2e};
      const float dl[2] = {delta_s[col], delta_s[col + 1]};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = e & 1, r = e >> 1;
        float pv = exp2f(s[f][e] * p.scale_log2 - lse2[j]);
        if (!all_visible) {
          const bool visible = (r ? real_hi : real_lo) && band.has(m0 + col + j, key_lo + 8 * r);
          if (!visible) pv = 0.f;
        }
        float dpv = dp[f][e], p_used = pv;
        if constexpr (kDropout) {
          const float keep = (keep_bits >> (4 * f + e)) & 1 ? p.dropout.keep_scale : 0.f;
          dpv *= keep;
          p_used *= keep;
        }
        dp[f][e] = pv * (dpv - dl[j]);
        s[f][e] = p_used;
      }
    }
    // dV += P^T dO, dK += dS^T Q (the scale is applied at the end)
#pragma unroll
    for (int kt = 0; kt < kBlockM / 16; ++kt) {
      const uint32_t ap[4] = {pack2<T>(s[2 * kt][0], s[2 * kt][1]),
                              pack2<T>(s[2 * kt][2], s[2 * kt][3]),
                              pack2<T>(s[2 * kt + 1][0], s[2 * kt + 1][1]),
                              pack2<T>(s[2 * kt + 1][2], s[2 * kt + 1][3])};
      const uint32_t ads[4] = {pack2<T>(dp[2 * kt][0], dp[2 * kt][1]),
                               pack2<T>(dp[2 * kt][2], dp[2 * kt][3]),
                               pack2<T>(dp[2 * kt + 1][0], dp[2 * kt + 1][1]),
                               pack2<T>(dp[2 * kt + 1][2], dp[2 * kt + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 16; ++dt) {
        uint32_t bd[4], bq[4];
        ldmatrix_x4_trans(bd, smem_addr(do_s + b_frag_offset(lane, kt * 16, dt * 16, kLd)));
        ldmatrix_x4_trans(bq, smem_addr(q_s + b_frag_offset(lane, kt * 16, dt * 16, kLd)));
        mma_16816<T>(dv[2 * dt], ap, bd[0], bd[1]);
        mma_16816<T>(dv[2 * dt + 1], ap, bd[2], bd[3]);
        mma_16816<T>(dk[2 * dt], ads, bq[0], bq[1]);
        mma_16816<T>(dk[2 * dt + 1], ads, bq[2], bq[3]);
      }
      if (p.dq_accum != nullptr) {  // dS^T to shared for the dQ product
        const int r = warp * 16 + (lane >> 2);
#pragma unroll
        for (int f = 2 * kt; f < 2 * kt + 2; ++f) {
          *reinterpret_cast<uint32_t*>(ds_s + r * kDsLd + f * 8 + 2 * c) =
              pack2<T>(dp[f][0], dp[f][1]);
          *reinterpret_cast<uint32_t*>(ds_s + (r + 8) * kDsLd + f * 8 + 2 * c) =
              pack2<T>(dp[f][2], dp[f][3]);
        }
      }
    }
    if (p.dq_accum != nullptr) {
      __syncthreads();  // all 64 keys' dS^T in shared
      // dQ[rows rg * 16 .., columns cg * kWarpCols ..] += dS K over this block's 64 keys
      const int rg = warp % Tr::kRowGroups, cg = warp / Tr::kRowGroups;
      constexpr int kCF = Tr::kWarpCols / 8;
      float acc[kCF][4];
#pragma unroll
      for (int f = 0; f < kCF; ++f) acc[f][0] = acc[f][1] = acc[f][2] = acc[f][3] = 0.f;
#pragma unroll
      for (int kt = 0; kt < kBlockN / 16; ++kt) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, smem_addr(ds_s + at_frag_offset(lane, rg * 16, kt * 16, kDsLd)));
#pragma unroll
        for (int dt = 0; dt < kCF / 2; ++dt) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, smem_addr(k_s + b_frag_offset(lane, kt * 16,
                                                              cg * Tr::kWarpCols + dt * 16, kLd)));
          mma_16816<T>(acc[2 * dt], a, bk[0], bk[1]);
          mma_16816<T>(acc[2 * dt + 1], a, bk[2], bk[3]);
        }
      }
      const int q_lo = m0 + rg * 16 + (lane >> 2);
      float* dst = row0(p.dq_accum, p.acc_st, b, seq.q0, h) + cg * Tr::kWarpCols + 2 * c;
#pragma unroll
      for (int f = 0; f < kCF; ++f) {
        if (q_lo < seq.Sq) {
          atomicAdd(dst + (int64_t)q_lo * p.acc_st.s + f * 8, acc[f][0]);
          atomicAdd(dst + (int64_t)q_lo * p.acc_st.s + f * 8 + 1, acc[f][1]);
        }
        if (q_lo + 8 < seq.Sq) {
          atomicAdd(dst + (int64_t)(q_lo + 8) * p.acc_st.s + f * 8, acc[f][2]);
          atomicAdd(dst + (int64_t)(q_lo + 8) * p.acc_st.s + f * 8 + 1, acc[f][3]);
        }
      }
    }
    cp_async_wait_all();  // the next tile has landed ...
    __syncthreads();      // ... for everyone, and this tile's buffers and dS^T are free
  }

  // Each warp stages its own 16 rows of the K/V tiles, which nobody reads any more.
  store_rows<T, D>(dv, 1.f, 1.f, v_s + warp * 16 * kLd, row0(p.dv, p.dv_st, b, seq.k0, h),
                   p.dv_st.s, warp_first, seq.Sk);
  store_rows<T, D>(dk, p.scale, p.scale, k_s + warp * 16 * kLd,
                   row0(p.dk, p.dk_st, b, seq.k0, h), p.dk_st.s, warp_first, seq.Sk);
}

// ---- 3. dQ accumulator -> dQ ---------------------------------------------------------------

// dq[i] = scale * acc[i] for n8 runs of 8 elements (both contiguous, same layout).
template <typename T>
__global__ void dq_convert_kernel(const float* acc, T* dq, int64_t n8, float scale) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float4 x = reinterpret_cast<const float4*>(acc)[2 * i];
    const float4 y = reinterpret_cast<const float4*>(acc)[2 * i + 1];
    const uint4 out = {pack2<T>(x.x * scale, x.y * scale), pack2<T>(x.z * scale, x.w * scale),
                       pack2<T>(y.x * scale, y.y * scale), pack2<T>(y.z * scale, y.w * scale)};
    reinterpret_cast<uint4*>(dq)[i] = out;
  }
}

// ---- 4. deterministic dQ -------------------------------------------------------------------

template <int D> struct DqTraits {
  static constexpr int kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kBlockM = 64;                 // queries per block, 16 per warp
  static constexpr int kBlockN = D == 128 ? 32 : 64;  // keys per tile
  static constexpr bool kQInRegs = D <= 64;           // Q and dO A-fragments in registers
  static constexpr int kLd = D + 8;
  // Q [64][kLd], dO [64][kLd], two stages of K [kBlockN][kLd] and V [kBlockN][kLd]
  static constexpr size_t kSmemBytes = (size_t)(2 * kBlockM + 4 * kBlockN) * kLd * 2;
};

template <typename T, int D, bool kDropout>
__global__ void __launch_bounds__(DqTraits<D>::kThreads, 2) dq_kernel(const Params<T> p) {
  using Tr = DqTraits<D>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kLd = Tr::kLd;
  constexpr int kNF = kBlockN / 8;
  constexpr uint64_t kFull = kBlockN == 64 ? ~0ull : (1ull << kBlockN) - 1;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* do_s = q_s + kBlockM * kLd;
  T* kv_s = do_s + kBlockM * kLd;

  const int h = blockIdx.y, b = blockIdx.z;
  const Seq seq = sequence(p, b);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= seq.Sq) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, c = lane & 3;
  const Band band = band_of(p, seq);
  const int warp_first = m0 + warp * 16;
  const int row_lo = warp_first + (lane >> 2);
  const T* k = row0(p.k, p.k_st, b, seq.k0, h);
  const T* v = row0(p.v, p.v_st, b, seq.k0, h);
  const uint8_t* mask = p.mask ? p.mask + (int64_t)b * p.Sk : nullptr;
  const float* lse = p.lse + b * p.lse_b + h * p.lse_h + seq.q0;
  const float* delta = p.delta + b * p.lse_b + h * p.lse_h + seq.q0;
  // +inf past the end: P = 0 there
  const float lse2_lo = row_lo < seq.Sq ? lse[row_lo] * kLog2e : INFINITY;
  const float lse2_hi = row_lo + 8 < seq.Sq ? lse[row_lo + 8] * kLog2e : INFINITY;
  const float delta_lo = row_lo < seq.Sq ? delta[row_lo] : 0.f;
  const float delta_hi = row_lo + 8 < seq.Sq ? delta[row_lo + 8] : 0.f;
  // the key tiles t_begin .. t_end - 1 the block's band reaches, tile t in stage t & 1
  const int t_begin = band.key_begin(m0) / kBlockN;
  const int n_end = band.key_end(min(m0 + kBlockM, seq.Sq) - 1, seq.Sk);
  const int t_end = (n_end + kBlockN - 1) / kBlockN;

  auto load_kv = [&](int tile, int stage) {
    T* k_dst = kv_s + stage * 2 * kBlockN * kLd;
    load_rows_async<kBlockN, D, Tr::kThreads>(k_dst, k, p.k_st.s, tile * kBlockN, seq.Sk);
    load_rows_async<kBlockN, D, Tr::kThreads>(k_dst + kBlockN * kLd, v, p.v_st.s,
                                              tile * kBlockN, seq.Sk);
  };
  load_rows_async<kBlockM, D, Tr::kThreads>(q_s, row0(p.q, p.q_st, b, seq.q0, h), p.q_st.s, m0,
                                            seq.Sq);
  load_rows_async<kBlockM, D, Tr::kThreads>(do_s, row0(p.dout, p.dout_st, b, seq.q0, h),
                                            p.dout_st.s, m0, seq.Sq);
  if (t_begin < t_end) load_kv(t_begin, t_begin & 1);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  uint32_t q_frag[Tr::kQInRegs ? D / 16 : 1][4], do_frag[Tr::kQInRegs ? D / 16 : 1][4];
  if constexpr (Tr::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      ldmatrix_x4(q_frag[kk], smem_addr(q_s + a_frag_offset(lane, warp * 16, kk * 16, kLd)));
      ldmatrix_x4(do_frag[kk], smem_addr(do_s + a_frag_offset(lane, warp * 16, kk * 16, kLd)));
    }
  }
  float dq[D / 8][4];
#pragma unroll
  for (int f = 0; f < D / 8; ++f) dq[f][0] = dq[f][1] = dq[f][2] = dq[f][3] = 0.f;

  for (int t = t_begin; t < t_end; ++t) {
    const int n0 = t * kBlockN;
    if (t + 1 < t_end) load_kv(t + 1, (t + 1) & 1);
    cp_async_commit();
    const T* k_s = kv_s + (t & 1) * 2 * kBlockN * kLd;
    const T* v_s = k_s + kBlockN * kLd;
    const uint64_t bits = key_bits(mask, n0, seq.Sk);
    if (band.meets(warp_first, warp_first + 15, n0, n0 + kBlockN - 1)) {
      uint32_t keep_bits = ~0u;
      if constexpr (kDropout)
        keep_bits = dropout_keep_bits<true, kNF>(p.dropout, b, h, row_lo, n0 + 2 * c);
      float s[kNF][4], dp[kNF][4];
#pragma unroll
      for (int f = 0; f < kNF; ++f)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[f][e] = dp[f][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t aq[4], ad[4];
        if constexpr (Tr::kQInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) aq[i] = q_frag[kk][i], ad[i] = do_frag[kk][i];
        } else {
          ldmatrix_x4(aq, smem_addr(q_s + a_frag_offset(lane, warp * 16, kk * 16, kLd)));
          ldmatrix_x4(ad, smem_addr(do_s + a_frag_offset(lane, warp * 16, kk * 16, kLd)));
        }
#pragma unroll
        for (int np = 0; np < kNF / 2; ++np) {
          uint32_t bk[4], bv[4];
          ldmatrix_x4(bk, smem_addr(k_s + bt_frag_offset(lane, np * 16, kk * 16, kLd)));
          ldmatrix_x4(bv, smem_addr(v_s + bt_frag_offset(lane, np * 16, kk * 16, kLd)));
          mma_16816<T>(s[2 * np], aq, bk[0], bk[1]);
          mma_16816<T>(s[2 * np + 1], aq, bk[2], bk[3]);
          mma_16816<T>(dp[2 * np], ad, bv[0], bv[1]);
          mma_16816<T>(dp[2 * np + 1], ad, bv[2], bv[3]);
        }
      }
      const bool all_visible = (bits & kFull) == kFull &&
                               band.inside(warp_first, warp_first + 15, n0, n0 + kBlockN - 1);
#pragma unroll
      for (int f = 0; f < kNF; ++f) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = e & 1, r = e >> 1;
          float pv = exp2f(s[f][e] * p.scale_log2 - (r ? lse2_hi : lse2_lo));
          if (!all_visible) {
            const int col = f * 8 + 2 * c + j;
            const bool visible = ((bits >> col) & 1) && band.has(row_lo + 8 * r, n0 + col);
            if (!visible) pv = 0.f;
          }
          float dpv = dp[f][e];
          if constexpr (kDropout)
            dpv = (keep_bits >> (4 * f + e)) & 1 ? dpv * p.dropout.keep_scale : 0.f;
          s[f][e] = pv * (dpv - (r ? delta_hi : delta_lo));  // dS
        }
      }
#pragma unroll
      for (int kt = 0; kt < kBlockN / 16; ++kt) {
        const uint32_t a[4] = {pack2<T>(s[2 * kt][0], s[2 * kt][1]),
                               pack2<T>(s[2 * kt][2], s[2 * kt][3]),
                               pack2<T>(s[2 * kt + 1][0], s[2 * kt + 1][1]),
                               pack2<T>(s[2 * kt + 1][2], s[2 * kt + 1][3])};
#pragma unroll
        for (int dt = 0; dt < D / 16; ++dt) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, smem_addr(k_s + b_frag_offset(lane, kt * 16, dt * 16, kLd)));
          mma_16816<T>(dq[2 * dt], a, bk[0], bk[1]);
          mma_16816<T>(dq[2 * dt + 1], a, bk[2], bk[3]);
        }
      }
    }
    cp_async_wait_all();
    __syncthreads();
  }
  store_rows<T, D>(dq, p.scale, p.scale, q_s + warp * 16 * kLd, row0(p.dq, p.dq_st, b, seq.q0, h),
                   p.dq_st.s, warp_first, seq.Sq);
}

}  // namespace attn
}  // namespace fastbert
