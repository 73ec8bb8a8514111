// Host launchers for attention (kernels/attention.cuh).
#include <algorithm>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>

#include "csrc/common.h"
#include "csrc/launchers.h"
#include "kernels/attention.cuh"

namespace fastbert {
namespace {

constexpr const char* kOp = "fastbert.attention";

attn::Strides to_strides(const Strides3& s) { return {s[0], s[1], s[2]}; }

void check_common(int64_t B, int64_t Sq, int64_t Sk, int64_t H, int64_t D,
                  std::initializer_list<std::pair<const char*, uintptr_t>> tensors,
                  std::initializer_list<std::pair<const char*, Strides3>> strides) {
  check_arg(D == 32 || D == 64 || D == 128, kOp,
            "the CUDA kernels support head dims 32, 64, 128, got " + std::to_string(D));
  check_arg(B >= 1 && B <= 65535 && H >= 1 && H <= 65535, kOp,
            "batch and heads must be in [1, 65535], got B=" + std::to_string(B) +
                " H=" + std::to_string(H));
  check_arg(Sq >= 0 && Sq <= INT32_MAX && Sk >= 0 && Sk <= INT32_MAX, kOp,
            "sequence lengths must be in [0, 2^31)");
  for (const auto& t : tensors)
    check_arg(t.second % 16 == 0, kOp,
              std::string("'") + t.first + "' must be 16-byte aligned for vector loads");
  for (const auto& s : strides)
    for (int64_t x : s.second)
      check_arg(x % 8 == 0, kOp,
                std::string("'") + s.first + "' strides must be multiples of 8 elements, got " +
                    std::to_string(x));
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream,
            const void* params_ptr, const char* name) {
  // > 48 KiB of dynamic shared memory must be opted into per kernel.
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
             kOp, name);
  void* args[] = {const_cast<void*>(params_ptr)};
  check_cuda(cudaLaunchKernel((const void*)kernel, grid, dim3(attn::kThreads), args, smem, stream),
             kOp, name);
}

// Calls f(std::integral_constant<int, D>) for the supported head dims.
template <typename F> void dispatch_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: check_arg(false, kOp, "unsupported head dim " + std::to_string(D));
  }
}

// Calls f(std::bool_constant<dropout>): the kernels with dropout are separate instantiations.
template <typename F> void dispatch_dropout(double p, F&& f) {
  if (p > 0.0) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

void check_dropout(double p) {
  check_arg(p >= 0.0 && p < 1.0, kOp, "dropout_p must be in [0, 1), got " + std::to_string(p));
}

unsigned tiles(int64_t s) { return (unsigned)((s + attn::kBlockM - 1) / attn::kBlockM); }

}  // namespace

void set_device(int device) {
  check_cuda(cudaSetDevice(device), "fastbert.cuda", "cudaSetDevice");
}

std::string probe_device() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && count == 0) return "no CUDA device found";
  cudaFuncAttributes attr;
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, attn::fwd_kernel<__half, 64, false>);
  if (err == cudaSuccess) return "";
  cudaGetLastError();
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

int64_t attention_smem_bytes(int64_t D) {
  int64_t bytes = 0;
  dispatch_head_dim(D, [&](auto d) {
    constexpr int kD = decltype(d)::value;
    bytes = (int64_t)std::max(attn::FwdSmem<__half, kD>::bytes, attn::BwdSmem<__half, kD>::bytes);
  });
  return bytes;
}

int64_t max_smem_per_block() {
  int device = 0, bytes = 0;
  check_cuda(cudaGetDevice(&device), "fastbert.attention", "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "fastbert.attention", "cudaDeviceGetAttribute");
  return bytes;
}

// The fields forward and backward share: inputs, output, lse, sizes, scale, masking, dropout.
template <typename T>
attn::Params<T> common_params(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask,
                              uintptr_t out, uintptr_t lse, int64_t B, int64_t Sq, int64_t Sk,
                              int64_t H, Strides3 q_st, Strides3 k_st, Strides3 v_st,
                              Strides3 out_st, bool causal, double scale, double dropout_p,
                              uint64_t seed) {
  attn::Params<T> p{};
  p.q = as_ptr<const T>(q);
  p.k = as_ptr<const T>(k);
  p.v = as_ptr<const T>(v);
  p.mask = as_ptr<const uint8_t>(mask);
  p.out = as_ptr<T>(out);
  p.lse = as_ptr<float>(lse);
  p.q_st = to_strides(q_st);
  p.k_st = to_strides(k_st);
  p.v_st = to_strides(v_st);
  p.out_st = to_strides(out_st);
  p.B = (int)B, p.H = (int)H, p.Sq = (int)Sq, p.Sk = (int)Sk;
  p.scale = (float)scale;
  p.causal = causal;
  p.dropout = make_dropout(dropout_p, seed);
  return p;
}

void attention_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t out,
                       uintptr_t lse, int64_t B, int64_t Sq, int64_t Sk, int64_t H, int64_t D,
                       Strides3 q_st, Strides3 k_st, Strides3 v_st, Strides3 out_st, bool causal,
                       double scale, double dropout_p, uint64_t seed, int dtype,
                       uintptr_t stream) {
  require_device(kOp);
  check_dropout(dropout_p);
  check_common(B, Sq, Sk, H, D, {{"q", q}, {"k", k}, {"v", v}, {"out", out}},
               {{"q", q_st}, {"k", k_st}, {"v", v_st}, {"out", out_st}});
  if (Sq == 0) return;
  dispatch_half(dtype, kOp, [&](auto t) {
    using T = decltype(t);
    const attn::Params<T> p = common_params<T>(q, k, v, mask, out, lse, B, Sq, Sk, H, q_st, k_st,
                                               v_st, out_st, causal, scale, dropout_p, seed);
    dispatch_head_dim(D, [&](auto d) {
      constexpr int kD = decltype(d)::value;
      dispatch_dropout(dropout_p, [&](auto drop) {
        launch(attn::fwd_kernel<T, kD, decltype(drop)::value>,
               dim3(tiles(Sq), (unsigned)H, (unsigned)B), attn::FwdSmem<T, kD>::bytes,
               as_stream(stream), &p, "attention fwd_kernel");
      });
    });
  });
}

void attention_backward(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                        uintptr_t lse, uintptr_t mask, uintptr_t dq, uintptr_t dk, uintptr_t dv,
                        uintptr_t delta, int64_t B, int64_t Sq, int64_t Sk, int64_t H, int64_t D,
                        Strides3 dout_st, Strides3 q_st, Strides3 k_st, Strides3 v_st,
                        Strides3 out_st, Strides3 dq_st, Strides3 dk_st, Strides3 dv_st,
                        bool causal, double scale, double dropout_p, uint64_t seed, int dtype,
                        uintptr_t stream) {
  require_device(kOp);
  check_dropout(dropout_p);
  check_common(B, Sq, Sk, H, D,
               {{"dout", dout}, {"q", q}, {"k", k}, {"v", v}, {"out", out}, {"dq", dq},
                {"dk", dk}, {"dv", dv}},
               {{"dout", dout_st}, {"q", q_st}, {"k", k_st}, {"v", v_st}, {"out", out_st},
                {"dq", dq_st}, {"dk", dk_st}, {"dv", dv_st}});
  if (Sq == 0 && Sk == 0) return;
  dispatch_half(dtype, kOp, [&](auto t) {
    using T = decltype(t);
    attn::Params<T> p = common_params<T>(q, k, v, mask, out, lse, B, Sq, Sk, H, q_st, k_st, v_st,
                                         out_st, causal, scale, dropout_p, seed);
    p.dout = as_ptr<const T>(dout);
    p.dq = as_ptr<T>(dq);
    p.dk = as_ptr<T>(dk);
    p.dv = as_ptr<T>(dv);
    p.delta = as_ptr<float>(delta);
    p.dout_st = to_strides(dout_st);
    p.dq_st = to_strides(dq_st);
    p.dk_st = to_strides(dk_st);
    p.dv_st = to_strides(dv_st);
    cudaStream_t s = as_stream(stream);
    const int64_t rows = B * H * Sq;
    if (rows > 0) {
      const int64_t blocks = (rows * 32 + 255) / 256;
      attn::bwd_delta_kernel<T><<<(unsigned)blocks, 256, 0, s>>>(p, (int)D);
      check_launch(kOp, "attention bwd_delta_kernel");
    }
    dispatch_head_dim(D, [&](auto d) {
      constexpr int kD = decltype(d)::value;
      const size_t smem = attn::BwdSmem<T, kD>::bytes;
      dispatch_dropout(dropout_p, [&](auto drop) {
        constexpr bool kDrop = decltype(drop)::value;
        if (Sk > 0)
          launch(attn::bwd_dkdv_kernel<T, kD, kDrop>, dim3(tiles(Sk), (unsigned)H, (unsigned)B),
                 smem, s, &p, "attention bwd_dkdv_kernel");
        if (Sq > 0)
          launch(attn::bwd_dq_kernel<T, kD, kDrop>, dim3(tiles(Sq), (unsigned)H, (unsigned)B),
                 smem, s, &p, "attention bwd_dq_kernel");
      });
    });
  });
}

}  // namespace fastbert
