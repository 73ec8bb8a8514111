// Host launchers of the fastbert kernels. Pointers, shapes, element strides and the stream
// come from Python (fastbert/cuda.py), which allocates every output. Dropout takes p in [0, 1)
// and a 64-bit seed (the Philox key, kernels/philox.cuh); backward must get forward's seed. Each launcher checks its
// arguments and every CUDA call, and throws an exception that names the op.
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <string>

namespace fastbert {

using Strides3 = std::array<int64_t, 3>;  // (batch, seq, head) element strides of (B, S, H, D)

// Makes `device` current for this extension's CUDA runtime (it is linked statically, so it
// keeps its own notion of the current device next to torch's).
void set_device(int device);

// "" when this build's kernels can run on `device` (made current), else the CUDA error that says
// why (no device, driver older than the runtime, no kernel image for this GPU). Never throws.
std::string probe_device(int device);

// Shared memory one attention block needs for head dim D in `dtype` (fastbert/cuda.py's code; the
// largest of forward and backward), and the most the current device allows a block to opt into.
int64_t attention_smem_bytes(int64_t D, int dtype);
// Block shapes of the attention kernels for head dim D: threads, query / key tile sizes and
// dynamic shared memory of fwd (with or without dropout), dkdv and dq, and of their fp32
// versions (fwd_fp32, dkdv_fp32, dq_fp32), for the static checks.
std::map<std::string, int64_t> attention_tile_info(int64_t D, bool dropout);
int64_t max_smem_per_block();

// window_left / window_right: flash-attn's sliding window (key j visible from query i when
// i + Sk - Sq - left <= j <= i + Sk - Sq + right), each >= 0 or -1 for unbounded; with causal.
void attention_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t out,
                       uintptr_t lse, int64_t B, int64_t Sq, int64_t Sk, int64_t H, int64_t D,
                       Strides3 q_st, Strides3 k_st, Strides3 v_st, Strides3 out_st, bool causal,
                       int64_t window_left, int64_t window_right, double scale, double dropout_p,
                       uint64_t seed, int dtype, uintptr_t stream);

// dq_accum: 0 for the deterministic path (a separate dQ kernel), else an fp32 buffer laid out
// like a contiguous q, which the backward zeroes, accumulates into with atomics and converts.
void attention_backward(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                        uintptr_t lse, uintptr_t mask, uintptr_t dq, uintptr_t dk, uintptr_t dv,
                        uintptr_t delta, uintptr_t dq_accum, int64_t B, int64_t Sq, int64_t Sk,
                        int64_t H, int64_t D, Strides3 dout_st, Strides3 q_st, Strides3 k_st,
                        Strides3 v_st, Strides3 out_st, Strides3 dq_st, Strides3 dk_st,
                        Strides3 dv_st, bool causal, int64_t window_left, int64_t window_right,
                        double scale, double dropout_p, uint64_t seed, int dtype,
                        uintptr_t stream);

// Packed sequences: tensors (total, H, D) with strides given as (0, row, head); cu_q / cu_k int32
// (B + 1) on the device; max_q / max_k bound every length; lse and delta (H, total_q).
void attention_varlen_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t cu_q,
                              uintptr_t cu_k, uintptr_t out, uintptr_t lse, int64_t B,
                              int64_t total_q, int64_t max_q, int64_t max_k, int64_t H, int64_t D,
                              Strides3 q_st, Strides3 k_st, Strides3 v_st, Strides3 out_st,
                              bool causal, int64_t window_left, int64_t window_right,
                              double scale, double dropout_p, uint64_t seed, int dtype,
                              uintptr_t stream);

void attention_varlen_backward(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v,
                               uintptr_t out, uintptr_t lse, uintptr_t cu_q, uintptr_t cu_k,
                               uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t delta,
                               uintptr_t dq_accum, int64_t B, int64_t total_q, int64_t max_q,
                               int64_t max_k, int64_t H, int64_t D, Strides3 dout_st,
                               Strides3 q_st, Strides3 k_st, Strides3 v_st, Strides3 out_st,
                               Strides3 dq_st, Strides3 dk_st, Strides3 dv_st, bool causal,
                               int64_t window_left, int64_t window_right, double scale,
                               double dropout_p, uint64_t seed, int dtype, uintptr_t stream);

// Residual add + LayerNorm over rows (rows, hidden), contiguous; residual may be 0. sum: 0, or
// where the pre-norm sum dropout(x) + residual goes (x's dtype; add_layer_norm's return_residual),
// and dsum: 0, or its gradient, added to the one through the norm.
void add_layer_norm_forward(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias,
                            uintptr_t y, uintptr_t sum, uintptr_t mean, uintptr_t rstd,
                            int64_t rows, int64_t hidden, double eps, double dropout_p,
                            uint64_t seed, int dtype, int weight_dtype, uintptr_t stream);

int64_t add_layer_norm_backward_parts(int64_t rows, int64_t hidden);

void add_layer_norm_backward(uintptr_t dy, uintptr_t dsum, uintptr_t x, uintptr_t residual,
                             uintptr_t weight, uintptr_t mean, uintptr_t rstd, uintptr_t dx,
                             uintptr_t dresidual, uintptr_t partial, uintptr_t dweight,
                             uintptr_t dbias, int64_t rows, int64_t hidden, int64_t parts,
                             double dropout_p, uint64_t seed, int dtype, int weight_dtype,
                             uintptr_t stream);

void bias_gelu_forward(uintptr_t acc, uintptr_t bias, uintptr_t pre, uintptr_t out, int64_t m,
                       int64_t n, bool tanh_approx, int dtype, uintptr_t stream);

int64_t gelu_backward_parts(int64_t m, int64_t n);

void gelu_backward(uintptr_t dout, uintptr_t pre, uintptr_t dpre, uintptr_t partial,
                   uintptr_t dbias, int64_t m, int64_t n, int64_t parts, bool tanh_approx,
                   int dtype, uintptr_t stream);

// Rotary embeddings (fastbert.apply_rotary; conjugate = the backward): x (rows, heads, head_dim)
// with element strides (row_stride, head_stride, 1), cos / sin (table_rows, half) contiguous in
// x's dtype or fp32 (table_dtype), positions int64 (rows,), out contiguous like x. A position
// outside [0, table_rows) gives NaN in that row's turned dims.
void apply_rotary(uintptr_t x, uintptr_t cos_table, uintptr_t sin_table, uintptr_t positions,
                  uintptr_t out, int64_t rows, int64_t heads, int64_t head_dim, int64_t half,
                  int64_t table_rows, int64_t row_stride, int64_t head_stride, bool interleaved,
                  bool conjugate, int dtype, int table_dtype, uintptr_t stream);

// GeGLU epilogues (fastbert.linear_geglu): pre (m, 2n) = x W^T from torch's GEMM, bias (2n,) or
// 0; out (m, n). Backward: dpre (m, 2n), partial (parts, 2n) fp32, dbias (2n,).
void geglu_forward(uintptr_t pre, uintptr_t bias, uintptr_t out, int64_t m, int64_t n,
                   bool tanh_approx, int dtype, uintptr_t stream);

int64_t geglu_backward_parts(int64_t m, int64_t n);

void geglu_backward(uintptr_t dout, uintptr_t pre, uintptr_t dpre, uintptr_t partial,
                    uintptr_t dbias, int64_t m, int64_t n, int64_t parts, bool tanh_approx,
                    int dtype, uintptr_t stream);

}  // namespace fastbert
