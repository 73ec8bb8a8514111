// Attention forward, FlashAttention-2 style: one block per (query tile, head, sequence), 16 query
// rows per warp (8 warps, 128 queries; 4 warps at D = 128). K/V tiles stream through two
// shared-memory stages filled by cp.async (tile t + 1 loads while tile t is computed); only the
// key tiles the block's band reaches (causal / sliding window) are loaded, and a warp skips those
// its own 16 rows' band misses. Per tile and warp: S = Q K^T in C fragments, masking only on
// tiles that need it (padding / sequence end from a 64-bit key mask, the band only on tiles
// crossing its edges), online softmax with quad shuffles, then the S fragments re-packed as the
// A operand of O += P V. O stays in registers until the epilogue.
#pragma once
#include "kernels/attention_common.cuh"

namespace fastbert {
namespace attn {

template <int D, bool kDropout> struct FwdTraits {
  // D = 128: 4 warps (a 64-query block) so that a thread may hold 255 registers at 2 blocks/SM
  // (O alone is 64 of them); else 8 warps (128 queries) at <= 128 registers.
  static constexpr int kWarps = D == 128 ? 4 : 8, kThreads = kWarps * 32;
  static constexpr int kBlockM = 16 * kWarps;  // queries per block, 16 per warp
  // keys per tile: 32 with dropout (registers) and at D = 128 (shared memory, 2 blocks/SM)
  static constexpr int kBlockN = D == 128 || kDropout ? 32 : 64;
  static constexpr int kLd = D + 8;  // shared row stride: 16 bytes of padding, so the 8 row
                                     // addresses of an ldmatrix fall in 8 different bank groups
  // Q [kBlockM][kLd], then two stages of K [kBlockN][kLd] and V [kBlockN][kLd], 16-bit elements.
  static constexpr size_t kSmemBytes = (size_t)(kBlockM + 4 * kBlockN) * kLd * 2;
};

template <typename T, int D, bool kDropout>
__global__ void __launch_bounds__(FwdTraits<D, kDropout>::kThreads, 2)
fwd_kernel(const Params<T> p) {
  using Tr = FwdTraits<D, kDropout>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kLd = Tr::kLd;
  constexpr int kNF = kBlockN / 8;  // key fragments per tile
  constexpr uint64_t kFull = kBlockN == 64 ? ~0ull : (1ull << kBlockN) - 1;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* kv_s = q_s + kBlockM * kLd;

  const int h = blockIdx.y, b = blockIdx.z;
  const Seq seq = sequence(p, b);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= seq.Sq) return;  // a tile past this sequence's end
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, c = lane & 3;
  const Band band = band_of(p, seq);
  const int warp_first = m0 + warp * 16;
  const int row_lo = warp_first + (lane >> 2);  // this lane's rows: row_lo and row_lo + 8
  const T* q = row0(p.q, p.q_st, b, seq.q0, h);
  const T* k = row0(p.k, p.k_st, b, seq.k0, h);
  const T* v = row0(p.v, p.v_st, b, seq.k0, h);
  const uint8_t* mask = p.mask ? p.mask + (int64_t)b * p.Sk : nullptr;
  // the key tiles t_begin .. t_end - 1 hold every key the block's queries see; tile t sits in
  // shared-memory stage t & 1
  const int t_begin = band.key_begin(m0) / kBlockN;
  const int n_end = band.key_end(min(m0 + kBlockM, seq.Sq) - 1, seq.Sk);
  const int t_end = (n_end + kBlockN - 1) / kBlockN;

  auto load_kv = [&](int tile, int stage) {
    T* k_dst = kv_s + stage * 2 * kBlockN * kLd;
    load_rows_async<kBlockN, D, Tr::kThreads>(k_dst, k, p.k_st.s, tile * kBlockN, seq.Sk);
    load_rows_async<kBlockN, D, Tr::kThreads>(k_dst + kBlockN * kLd, v, p.v_st.s,
                                              tile * kBlockN, seq.Sk);
  };
  load_rows_async<kBlockM, D, Tr::kThreads>(q_s, q, p.q_st.s, m0, seq.Sq);
  if (t_begin < t_end) load_kv(t_begin, t_begin & 1);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // Q A-fragments stay in registers. Each warp reads only its own 16 rows of q_s, and later
  // stages its own output rows there, so q_s needs no block-wide barrier.
  uint32_t q_frag[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(q_frag[kk], smem_addr(q_s + a_frag_offset(lane, warp * 16, kk * 16, kLd)));

  float o[D / 8][4];
#pragma unroll
  for (int f = 0; f < D / 8; ++f) o[f][0] = o[f][1] = o[f][2] = o[f][3] = 0.f;
  // running row max (log2 domain; -inf while no key was visible) and this lane's share of the
  // row sum (the quad's shares are added in the epilogue: alpha is the same across the quad)
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

  for (int t = t_begin; t < t_end; ++t) {
    const int n0 = t * kBlockN;
    if (t + 1 < t_end) load_kv(t + 1, (t + 1) & 1);
    cp_async_commit();
    const T* k_s = kv_s + (t & 1) * 2 * kBlockN * kLd;
    const T* v_s = k_s + kBlockN * kLd;
    const uint64_t bits = key_bits(mask, n0, seq.Sk);
    // else no row of this warp sees the tile
    if (band.meets(warp_first, warp_first + 15, n0, n0 + kBlockN - 1)) {
      // drawn before S exists: fewer live registers while Philox runs
      uint32_t keep = ~0u;
      if constexpr (kDropout)
        keep = dropout_keep_bits<true, kNF>(p.dropout, b, h, row_lo, n0 + 2 * c);
      float s[kNF][4];
#pragma unroll
      for (int f = 0; f < kNF; ++f) s[f][0] = s[f][1] = s[f][2] = s[f][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < kNF / 2; ++np) {
          uint32_t bk[4];
          ldmatrix_x4(bk, smem_addr(k_s + bt_frag_offset(lane, np * 16, kk * 16, kLd)));
          mma_16816<T>(s[2 * np], q_frag[kk], bk[0], bk[1]);
          mma_16816<T>(s[2 * np + 1], q_frag[kk], bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int f = 0; f < kNF; ++f)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[f][e] *= p.scale_log2;
      const bool all_visible = (bits & kFull) == kFull &&
                               band.inside(warp_first, warp_first + 15, n0, n0 + kBlockN - 1);
      if (!all_visible) {
#pragma unroll
        for (int f = 0; f < kNF; ++f)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = f * 8 + 2 * c + (e & 1), row = row_lo + (e >> 1) * 8;
            const bool visible = ((bits >> col) & 1) && band.has(row, n0 + col);
            if (!visible) s[f][e] = -INFINITY;
          }
      }
      float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
      for (int f = 0; f < kNF; ++f) {
        mx_lo = fmaxf(mx_lo, fmaxf(s[f][0], s[f][1]));
        mx_hi = fmaxf(mx_hi, fmaxf(s[f][2], s[f][3]));
      }
#pragma unroll
      for (int x = 1; x <= 2; x <<= 1) {
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, x));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, x));
      }
      // exp2 base: 0 while a row has seen nothing (its P is then exp2(-inf) = 0, never NaN)
      const float base_lo = mx_lo == -INFINITY ? 0.f : mx_lo;
      const float base_hi = mx_hi == -INFINITY ? 0.f : mx_hi;
      const float alpha_lo = exp2f(m_lo - base_lo), alpha_hi = exp2f(m_hi - base_hi);
      m_lo = mx_lo;
      m_hi = mx_hi;
      l_lo *= alpha_lo;
      l_hi *= alpha_hi;
#pragma unroll
      for (int f = 0; f < D / 8; ++f) {
        o[f][0] *= alpha_lo;
        o[f][1] *= alpha_lo;
        o[f][2] *= alpha_hi;
        o[f][3] *= alpha_hi;
      }
#pragma unroll
      for (int f = 0; f < kNF; ++f) {
        s[f][0] = exp2f(s[f][0] - base_lo);
        s[f][1] = exp2f(s[f][1] - base_lo);
        s[f][2] = exp2f(s[f][2] - base_hi);
        s[f][3] = exp2f(s[f][3] - base_hi);
        l_lo += s[f][0] + s[f][1];  // the normaliser is that of the undropped probabilities
        l_hi += s[f][2] + s[f][3];
        if constexpr (kDropout) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[f][e] = (keep >> (4 * f + e)) & 1 ? s[f][e] : 0.f;
        }
      }
#pragma unroll
      for (int kt = 0; kt < kBlockN / 16; ++kt) {
        const uint32_t a[4] = {pack2<T>(s[2 * kt][0], s[2 * kt][1]),
                               pack2<T>(s[2 * kt][2], s[2 * kt][3]),
                               pack2<T>(s[2 * kt + 1][0], s[2 * kt + 1][1]),
                               pack2<T>(s[2 * kt + 1][2], s[2 * kt + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, smem_addr(v_s + b_frag_offset(lane, kt * 16, dp * 16, kLd)));
          mma_16816<T>(o[2 * dp], a, bv[0], bv[1]);
          mma_16816<T>(o[2 * dp + 1], a, bv[2], bv[3]);
        }
      }
    }
    cp_async_wait_all();  // tile t + 1 has landed ...
    __syncthreads();      // ... for every thread, and nobody still reads stage t & 1
  }

#pragma unroll
  for (int x = 1; x <= 2; x <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, x);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, x);
  }
  const float keep_scale = kDropout ? p.dropout.keep_scale : 1.f;
  if (c == 0) {
    float* lse = p.lse + b * p.lse_b + h * p.lse_h + seq.q0;
    if (row_lo < seq.Sq) lse[row_lo] = l_lo > 0.f ? (m_lo + log2f(l_lo)) * kLn2 : INFINITY;
    if (row_lo + 8 < seq.Sq) lse[row_lo + 8] = l_hi > 0.f ? (m_hi + log2f(l_hi)) * kLn2 : INFINITY;
  }
  store_rows<T, D>(o, l_lo > 0.f ? keep_scale / l_lo : 0.f, l_hi > 0.f ? keep_scale / l_hi : 0.f,
                   q_s + warp * 16 * kLd, row0(p.out, p.out_st, b, seq.q0, h), p.out_st.s,
                   warp_first, seq.Sq);
}

}  // namespace attn
}  // namespace fastbert
