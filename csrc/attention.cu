// Host launchers for attention, dense (B, S, H, D) and packed varlen (total, H, D):
// kernels/attention_fwd.cuh and kernels/attention_bwd.cuh (fp16 / bf16), attention_fp32.cuh (fp32).
#include <algorithm>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include "csrc/common.h"
#include "csrc/launchers.h"
#include "kernels/attention_bwd.cuh"
#include "kernels/attention_fp32.cuh"
#include "kernels/attention_fwd.cuh"

namespace fastbert {
namespace {

constexpr const char* kOp = "fastbert.attention";
constexpr const char* kVarlenOp = "fastbert.attention_varlen";

attn::Strides to_strides(const Strides3& s) { return {s[0], s[1], s[2]}; }

void check_shapes(const char* op, int64_t B, int64_t Sq, int64_t Sk, int64_t H, int64_t D,
                  std::initializer_list<std::pair<const char*, uintptr_t>> tensors,
                  std::initializer_list<std::pair<const char*, Strides3>> strides) {
  check_arg(D == 32 || D == 64 || D == 128, op,
            "the CUDA kernels support head dims 32, 64, 128, got " + std::to_string(D));
  check_arg(B >= 1 && B <= 65535 && H >= 1 && H <= 65535, op,
            "batch and heads must be in [1, 65535], got B=" + std::to_string(B) +
                " H=" + std::to_string(H));
  check_arg(Sq >= 0 && Sq <= INT32_MAX && Sk >= 0 && Sk <= INT32_MAX, op,
            "sequence lengths must be in [0, 2^31)");
  for (const auto& t : tensors)
    check_arg(t.second % 16 == 0, op,
              std::string("'") + t.first + "' must be 16-byte aligned for vector loads");
  for (const auto& s : strides)
    for (int64_t x : s.second)
      check_arg(x % 8 == 0, op,
                std::string("'") + s.first + "' strides must be multiples of 8 elements, got " +
                    std::to_string(x));
}

void check_dropout(const char* op, double p) {
  check_arg(p >= 0.0 && p < 1.0, op, "dropout_p must be in [0, 1), got " + std::to_string(p));
}

void check_window(const char* op, int64_t left, int64_t right) {
  check_arg(left >= -1 && right >= -1, op,
            "window_size must be (left, right), each >= 0 or -1 for unbounded, got (" +
                std::to_string(left) + ", " + std::to_string(right) + ")");
}

// One side of the band as the kernels take it (Params::band_lo / band_hi): a side at least
// Sq + Sk wide bounds no key distance, so it is unbounded, and what remains fits an int.
int band_side(int64_t w, int64_t Sq, int64_t Sk) {
  return w < 0 || w >= Sq + Sk ? attn::kUnbounded : (int)w;
}

// Kernels needing > 48 KiB of dynamic shared memory must opt in, once per kernel and device
// (cudaFuncSetAttribute costs a driver call, so it is not repeated per launch).
void allow_smem(const void* kernel, size_t smem, const char* op, const char* name) {
  if (smem <= 48 * 1024) return;
  int device = 0;
  check_cuda(cudaGetDevice(&device), op, "cudaGetDevice");
  static std::mutex lock;
  static std::unordered_map<const void*, uint64_t> done;  // kernel -> bit per device
  std::lock_guard<std::mutex> guard(lock);
  uint64_t& devices = done[kernel];
  const uint64_t bit = device < 64 ? 1ull << device : 0;
  if (bit != 0 && (devices & bit)) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
             op, name);
  devices |= bit;
}

template <typename T>
void launch(void (*kernel)(attn::Params<T>), dim3 grid, int threads, size_t smem,
            cudaStream_t stream, const attn::Params<T>& p, const char* op, const char* name) {
  allow_smem((const void*)kernel, smem, op, name);
  void* args[] = {const_cast<attn::Params<T>*>(&p)};
  check_cuda(cudaLaunchKernel((const void*)kernel, grid, dim3(threads), args, smem, stream), op,
             name);
}

// Calls f(std::integral_constant<int, D>) for the supported head dims.
template <typename F> void dispatch_head_dim(const char* op, int64_t D, F&& f) {
  switch (D) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: check_arg(false, op, "unsupported head dim " + std::to_string(D));
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

unsigned cdiv(int64_t a, int64_t b) { return (unsigned)((a + b - 1) / b); }

// The fields forward and backward share.
template <typename T>
attn::Params<T> make_params(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                            int64_t B, int64_t Sq, int64_t Sk, int64_t H, Strides3 q_st,
                            Strides3 k_st, Strides3 v_st, Strides3 out_st, bool causal,
                            int64_t window_left, int64_t window_right, double scale,
                            double dropout_p, uint64_t seed) {
  attn::Params<T> p{};
  p.q = as_ptr<const T>(q);
  p.k = as_ptr<const T>(k);
  p.v = as_ptr<const T>(v);
  p.out = as_ptr<T>(out);
  p.lse = as_ptr<float>(lse);
  p.q_st = to_strides(q_st);
  p.k_st = to_strides(k_st);
  p.v_st = to_strides(v_st);
  p.out_st = to_strides(out_st);
  p.B = (int)B, p.H = (int)H, p.Sq = (int)Sq, p.Sk = (int)Sk;
  p.scale = (float)scale;
  p.scale_log2 = p.scale * attn::kLog2e;
  // causal is the band's right side at 0 (bottom-right aligned, as the window)
  p.band_lo = -band_side(window_left, Sq, Sk);
  p.band_hi = causal ? 0 : band_side(window_right, Sq, Sk);
  p.dropout = make_dropout(dropout_p, seed);
  return p;
}

// fp32 runs the SIMT kernels (kernels/attention_fp32.cuh), fp16 / bf16 the tensor-core ones.
template <typename T> constexpr bool kSimt = std::is_same<T, float>::value;

template <typename T>
void run_forward(const attn::Params<T>& p, int64_t D, double dropout_p, cudaStream_t stream,
                 const char* op) {
  dispatch_head_dim(op, D, [&](auto d) {
    constexpr int kD = decltype(d)::value;
    dispatch_dropout(dropout_p, [&](auto drop) {
      constexpr bool kDrop = decltype(drop)::value;
      if constexpr (kSimt<T>) {
        using Tr = attn::Fp32FwdTraits<kD>;
        launch<T>(attn::fwd_kernel_fp32<kD, kDrop>,
                  dim3(cdiv(p.Sq, Tr::kBlockM), (unsigned)p.H, (unsigned)p.B),
                  attn::kFp32Threads, Tr::kSmemBytes, stream, p, op,
                  "attention fwd_kernel_fp32");
      } else {
        using Tr = attn::FwdTraits<kD, kDrop>;
        launch<T>(attn::fwd_kernel<T, kD, kDrop>,
                  dim3(cdiv(p.Sq, Tr::kBlockM), (unsigned)p.H, (unsigned)p.B), Tr::kThreads,
                  Tr::kSmemBytes, stream, p, op, "attention fwd_kernel");
      }
    });
  });
}

// Backward after the caller filled the gradient fields. total_q: rows of q (B * Sq dense).
template <typename T>
void run_backward(const attn::Params<T>& p, int64_t D, int64_t total_q, double dropout_p,
                  cudaStream_t stream, const char* op) {
  dispatch_head_dim(op, D, [&](auto d) {
    constexpr int kD = decltype(d)::value;
    if (p.Sq > 0) {
      constexpr int kRows = attn::DeltaTraits<T, kD>::kRows;
      attn::delta_kernel<T, kD>
          <<<dim3(cdiv(p.Sq, kRows), p.H, p.B), attn::kDeltaThreads, 0, stream>>>(p);
      check_launch(op, "attention delta_kernel");
    }
    dispatch_dropout(dropout_p, [&](auto drop) {
      constexpr bool kDrop = decltype(drop)::value;
      const bool dq_kernel = p.dq_accum == nullptr && p.Sq > 0;
      if constexpr (kSimt<T>) {
        using Bw = attn::Fp32BwdTraits<kD>;
        using Dq = attn::Fp32DqTraits<kD>;
        if (p.Sk > 0)
          launch<T>(attn::dkdv_kernel_fp32<kD, kDrop>, dim3(cdiv(p.Sk, Bw::kBlockN), p.H, p.B),
                    attn::kFp32Threads, Bw::kSmemBytes, stream, p, op,
                    "attention dkdv_kernel_fp32");
        if (dq_kernel)
          launch<T>(attn::dq_kernel_fp32<kD, kDrop>, dim3(cdiv(p.Sq, Dq::kBlockM), p.H, p.B),
                    attn::kFp32Threads, Dq::kSmemBytes, stream, p, op,
                    "attention dq_kernel_fp32");
      } else {
        using Bw = attn::BwdTraits<kD>;
        using Dq = attn::DqTraits<kD>;
        if (p.Sk > 0)
          launch<T>(attn::dkdv_kernel<T, kD, kDrop>, dim3(cdiv(p.Sk, Bw::kBlockN), p.H, p.B),
                    Bw::kThreads, Bw::kSmemBytes, stream, p, op, "attention dkdv_kernel");
        if (dq_kernel)
          launch<T>(attn::dq_kernel<T, kD, kDrop>, dim3(cdiv(p.Sq, Dq::kBlockM), p.H, p.B),
                    Dq::kThreads, Dq::kSmemBytes, stream, p, op, "attention dq_kernel");
      }
    });
  });
  if constexpr (!kSimt<T>) {  // fp32's atomics land in dq itself
    if (p.dq_accum != nullptr && total_q > 0) {
      const int64_t n8 = total_q * p.H * D / 8;
      const unsigned blocks = (unsigned)std::min<int64_t>((n8 + 255) / 256, 65535);
      attn::dq_convert_kernel<T><<<blocks, 256, 0, stream>>>(p.dq_accum, p.dq, n8, p.scale);
      check_launch(op, "attention dq_convert_kernel");
    }
  }
}

template <typename T>
void set_grad_fields(attn::Params<T>& p, uintptr_t dout, uintptr_t dq, uintptr_t dk,
                     uintptr_t dv, uintptr_t delta, uintptr_t dq_accum, Strides3 dout_st,
                     Strides3 dq_st, Strides3 dk_st, Strides3 dv_st) {
  p.dout = as_ptr<const T>(dout);
  p.dq = as_ptr<T>(dq);
  p.dk = as_ptr<T>(dk);
  p.dv = as_ptr<T>(dv);
  p.delta = as_ptr<float>(delta);
  p.dq_accum = as_ptr<float>(dq_accum);
  p.dout_st = to_strides(dout_st);
  p.dq_st = to_strides(dq_st);
  p.dk_st = to_strides(dk_st);
  p.dv_st = to_strides(dv_st);
  p.acc_st = p.dq_st;  // the accumulator has dq's (contiguous) layout, in fp32
  // fp32: the atomics add into dq itself, pre-scaled (no accumulator, no convert pass)
  if constexpr (kSimt<T>)
    if (p.dq_accum != nullptr) p.dq_accum = p.dq;
}

}  // namespace

void set_device(int device) {
  check_cuda(cudaSetDevice(device), "fastbert.cuda", "cudaSetDevice");
}

std::string probe_device(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && count == 0) return "no CUDA device found";
  if (err == cudaSuccess) err = cudaSetDevice(device);
  cudaFuncAttributes attr;
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, attn::fwd_kernel<__half, 64, false>);
  if (err == cudaSuccess) return "";
  cudaGetLastError();
  std::string why = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  if (err == cudaErrorInsufficientDriver || err == cudaErrorCompatNotSupportedOnDevice) {
    int driver = 0;
    cudaDriverGetVersion(&driver);
    why = "the NVIDIA driver supports CUDA " + std::to_string(driver / 1000) + "." +
          std::to_string(driver % 1000 / 10) + " but this extension links the CUDA " +
          std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10) +
          " runtime statically: update the driver, or rebuild fastbert with a CUDA toolkit no "
          "newer than the driver (" + why + ")";
  }
  return why;
}

int64_t attention_smem_bytes(int64_t D, int dtype) {
  int64_t bytes = 0;
  dispatch_float(dtype, kOp, [&](auto t) {
    dispatch_head_dim(kOp, D, [&](auto d) {
      constexpr int kD = decltype(d)::value;
      if constexpr (kSimt<decltype(t)>) {
        bytes = (int64_t)std::max({attn::Fp32FwdTraits<kD>::kSmemBytes,
                                   attn::Fp32DqTraits<kD>::kSmemBytes,
                                   attn::Fp32BwdTraits<kD>::kSmemBytes});
      } else {
        bytes = (int64_t)std::max({attn::FwdTraits<kD, false>::kSmemBytes,
                                   attn::BwdTraits<kD>::kSmemBytes,
                                   attn::DqTraits<kD>::kSmemBytes});
      }
    });
  });
  return bytes;
}

std::map<std::string, int64_t> attention_tile_info(int64_t D, bool dropout) {
  std::map<std::string, int64_t> info;
  dispatch_head_dim(kOp, D, [&](auto d) {
    constexpr int kD = decltype(d)::value;
    auto fwd = [&](auto drop) {
      using Tr = attn::FwdTraits<kD, decltype(drop)::value>;
      info["fwd_threads"] = Tr::kThreads, info["fwd_block_m"] = Tr::kBlockM;
      info["fwd_block_n"] = Tr::kBlockN, info["fwd_smem"] = (int64_t)Tr::kSmemBytes;
    };
    if (dropout) fwd(std::true_type{}); else fwd(std::false_type{});
    using Bw = attn::BwdTraits<kD>;
    info["dkdv_threads"] = Bw::kThreads, info["dkdv_block_m"] = Bw::kBlockM;
    info["dkdv_block_n"] = Bw::kBlockN, info["dkdv_warp_cols"] = Bw::kWarpCols;
    info["dkdv_smem"] = (int64_t)Bw::kSmemBytes;
    using Dq = attn::DqTraits<kD>;
    info["dq_threads"] = Dq::kThreads, info["dq_block_m"] = Dq::kBlockM;
    info["dq_block_n"] = Dq::kBlockN, info["dq_smem"] = (int64_t)Dq::kSmemBytes;
    // the fp32 (SIMT) kernels
    using Fw32 = attn::Fp32FwdTraits<kD>;
    using Bw32 = attn::Fp32BwdTraits<kD>;
    using Dq32 = attn::Fp32DqTraits<kD>;
    info["fwd_fp32_threads"] = info["dkdv_fp32_threads"] = info["dq_fp32_threads"] =
        attn::kFp32Threads;
    info["fwd_fp32_block_m"] = Fw32::kBlockM, info["fwd_fp32_block_n"] = Fw32::kBlockN;
    info["fwd_fp32_smem"] = (int64_t)Fw32::kSmemBytes;
    info["dkdv_fp32_block_m"] = Bw32::kBlockM, info["dkdv_fp32_block_n"] = Bw32::kBlockN;
    info["dkdv_fp32_smem"] = (int64_t)Bw32::kSmemBytes;
    info["dq_fp32_block_m"] = Dq32::kBlockM, info["dq_fp32_block_n"] = Dq32::kBlockN;
    info["dq_fp32_smem"] = (int64_t)Dq32::kSmemBytes;
  });
  return info;
}

int64_t max_smem_per_block() {
  int device = 0, bytes = 0;
  check_cuda(cudaGetDevice(&device), kOp, "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), kOp,
             "cudaDeviceGetAttribute");
  return bytes;
}

void attention_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t out,
                       uintptr_t lse, int64_t B, int64_t Sq, int64_t Sk, int64_t H, int64_t D,
                       Strides3 q_st, Strides3 k_st, Strides3 v_st, Strides3 out_st, bool causal,
                       int64_t window_left, int64_t window_right, double scale, double dropout_p,
                       uint64_t seed, int dtype, uintptr_t stream) {
  require_device(kOp);
  check_dropout(kOp, dropout_p);
  check_window(kOp, window_left, window_right);
  check_shapes(kOp, B, Sq, Sk, H, D, {{"q", q}, {"k", k}, {"v", v}, {"out", out}},
               {{"q", q_st}, {"k", k_st}, {"v", v_st}, {"out", out_st}});
  if (Sq == 0) return;
  dispatch_float(dtype, kOp, [&](auto t) {
    using T = decltype(t);
    attn::Params<T> p = make_params<T>(q, k, v, out, lse, B, Sq, Sk, H, q_st, k_st, v_st, out_st,
                                       causal, window_left, window_right, scale, dropout_p, seed);
    p.mask = as_ptr<const uint8_t>(mask);
    p.lse_b = H * Sq, p.lse_h = Sq;
    run_forward(p, D, dropout_p, as_stream(stream), kOp);
  });
}

void attention_backward(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                        uintptr_t lse, uintptr_t mask, uintptr_t dq, uintptr_t dk, uintptr_t dv,
                        uintptr_t delta, uintptr_t dq_accum, int64_t B, int64_t Sq, int64_t Sk,
                        int64_t H, int64_t D, Strides3 dout_st, Strides3 q_st, Strides3 k_st,
                        Strides3 v_st, Strides3 out_st, Strides3 dq_st, Strides3 dk_st,
                        Strides3 dv_st, bool causal, int64_t window_left, int64_t window_right,
                        double scale, double dropout_p, uint64_t seed, int dtype,
                        uintptr_t stream) {
  require_device(kOp);
  check_dropout(kOp, dropout_p);
  check_window(kOp, window_left, window_right);
  check_shapes(kOp, B, Sq, Sk, H, D,
               {{"dout", dout}, {"q", q}, {"k", k}, {"v", v}, {"out", out}, {"dq", dq},
                {"dk", dk}, {"dv", dv}, {"dq_accum", dq_accum}},
               {{"dout", dout_st}, {"q", q_st}, {"k", k_st}, {"v", v_st}, {"out", out_st},
                {"dq", dq_st}, {"dk", dk_st}, {"dv", dv_st}});
  if (Sq == 0 && Sk == 0) return;
  dispatch_float(dtype, kOp, [&](auto t) {
    using T = decltype(t);
    attn::Params<T> p = make_params<T>(q, k, v, out, lse, B, Sq, Sk, H, q_st, k_st, v_st, out_st,
                                       causal, window_left, window_right, scale, dropout_p, seed);
    p.mask = as_ptr<const uint8_t>(mask);
    p.lse_b = H * Sq, p.lse_h = Sq;
    set_grad_fields(p, dout, dq, dk, dv, delta, dq_accum, dout_st, dq_st, dk_st, dv_st);
    run_backward(p, D, B * Sq, dropout_p, as_stream(stream), kOp);
  });
}

void attention_varlen_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t cu_q,
                              uintptr_t cu_k, uintptr_t out, uintptr_t lse, int64_t B,
                              int64_t total_q, int64_t max_q, int64_t max_k, int64_t H, int64_t D,
                              Strides3 q_st, Strides3 k_st, Strides3 v_st, Strides3 out_st,
                              bool causal, int64_t window_left, int64_t window_right,
                              double scale, double dropout_p, uint64_t seed, int dtype,
                              uintptr_t stream) {
  require_device(kVarlenOp);
  check_dropout(kVarlenOp, dropout_p);
  check_window(kVarlenOp, window_left, window_right);
  check_shapes(kVarlenOp, B, max_q, max_k, H, D, {{"q", q}, {"k", k}, {"v", v}, {"out", out}},
               {{"q", q_st}, {"k", k_st}, {"v", v_st}, {"out", out_st}});
  if (total_q == 0 || max_q == 0) return;
  dispatch_float(dtype, kVarlenOp, [&](auto t) {
    using T = decltype(t);
    attn::Params<T> p =
        make_params<T>(q, k, v, out, lse, B, max_q, max_k, H, q_st, k_st, v_st, out_st, causal,
                       window_left, window_right, scale, dropout_p, seed);
    p.cu_q = as_ptr<const int>(cu_q);
    p.cu_k = as_ptr<const int>(cu_k);
    p.lse_b = 0, p.lse_h = total_q;
    run_forward(p, D, dropout_p, as_stream(stream), kVarlenOp);
  });
}

void attention_varlen_backward(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v,
                               uintptr_t out, uintptr_t lse, uintptr_t cu_q, uintptr_t cu_k,
                               uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t delta,
                               uintptr_t dq_accum, int64_t B, int64_t total_q, int64_t max_q,
                               int64_t max_k, int64_t H, int64_t D, Strides3 dout_st,
                               Strides3 q_st, Strides3 k_st, Strides3 v_st, Strides3 out_st,
                               Strides3 dq_st, Strides3 dk_st, Strides3 dv_st, bool causal,
                               int64_t window_left, int64_t window_right, double scale,
                               double dropout_p, uint64_t seed, int dtype, uintptr_t stream) {
  require_device(kVarlenOp);
  check_dropout(kVarlenOp, dropout_p);
  check_window(kVarlenOp, window_left, window_right);
  check_shapes(kVarlenOp, B, max_q, max_k, H, D,
               {{"dout", dout}, {"q", q}, {"k", k}, {"v", v}, {"out", out}, {"dq", dq},
                {"dk", dk}, {"dv", dv}, {"dq_accum", dq_accum}},
               {{"dout", dout_st}, {"q", q_st}, {"k", k_st}, {"v", v_st}, {"out", out_st},
                {"dq", dq_st}, {"dk", dk_st}, {"dv", dv_st}});
  if (max_q == 0 && max_k == 0) return;
  dispatch_float(dtype, kVarlenOp, [&](auto t) {
    using T = decltype(t);
    attn::Params<T> p =
        make_params<T>(q, k, v, out, lse, B, max_q, max_k, H, q_st, k_st, v_st, out_st, causal,
                       window_left, window_right, scale, dropout_p, seed);
    p.cu_q = as_ptr<const int>(cu_q);
    p.cu_k = as_ptr<const int>(cu_k);
    p.lse_b = 0, p.lse_h = total_q;
    set_grad_fields(p, dout, dq, dk, dv, delta, dq_accum, dout_st, dq_st, dk_st, dv_st);
    run_backward(p, D, total_q, dropout_p, as_stream(stream), kVarlenOp);
  });
}

}  // namespace fastbert
