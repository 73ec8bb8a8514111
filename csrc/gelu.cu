// Host launchers for the FFN epilogues (kernels/gelu.cuh): bias + GELU, dGELU + dbias.
#include <algorithm>
#include <type_traits>

#include "csrc/common.h"
#include "csrc/launchers.h"
#include "kernels/gelu.cuh"
#include "kernels/layer_norm.cuh"  // column_sum_kernel

namespace fastbert {
namespace {

constexpr const char* kOp = "fastbert.linear_bias_gelu";
constexpr int kRowsPerBlock = 8;  // gelu_bwd_kernel's blockDim.y

void check_shapes(int64_t m, int64_t n) {
  check_arg(m >= 0 && m <= INT32_MAX, kOp, "rows must be in [0, 2^31), got " + std::to_string(m));
  check_arg(n >= 1 && n <= INT32_MAX, kOp,
            "out_features must be in [1, 2^31), got " + std::to_string(n));
}

}  // namespace

void bias_gelu_forward(uintptr_t acc, uintptr_t bias, uintptr_t pre, uintptr_t out, int64_t m,
                       int64_t n, bool tanh_approx, int dtype, uintptr_t stream) {
  require_device(kOp);
  check_shapes(m, n);
  if (m == 0) return;
  dispatch_float(dtype, kOp, [&](auto t) {
    using T = decltype(t);
    by_width<T>(n, {acc, pre, out}, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const int64_t chunks = m * n / V;
      const int threads = 256;
      const int64_t blocks = std::min<int64_t>((chunks + threads - 1) / threads,
                                               (int64_t)sm_count(kOp) * 16);
      bias_gelu_fwd_kernel<T, V><<<(unsigned)blocks, threads, 0, as_stream(stream)>>>(
          as_ptr<const T>(acc), as_ptr<const T>(bias), as_ptr<T>(pre), as_ptr<T>(out), m * n,
          (int)n, tanh_approx);
      check_launch(kOp, "bias_gelu_fwd_kernel");
    });
  });
}

int64_t gelu_backward_parts(int64_t m, int64_t n) {
  require_device(kOp);
  return epilogue_backward_parts(kOp, m, kRowsPerBlock);
}

void gelu_backward(uintptr_t dout, uintptr_t pre, uintptr_t dpre, uintptr_t partial,
                   uintptr_t dbias, int64_t m, int64_t n, int64_t parts, bool tanh_approx,
                   int dtype, uintptr_t stream) {
  require_device(kOp);
  check_shapes(m, n);
  check_arg(parts >= 1 && parts <= 65535, kOp,
            "partial-sum block count must be in [1, 65535], got " + std::to_string(parts));
  dispatch_float(dtype, kOp, [&](auto t) {
    using T = decltype(t);
    by_width<T>(n, {dout, pre, dpre}, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const dim3 grid((unsigned)((n + 32 * V - 1) / (32 * V)), (unsigned)parts);
      gelu_bwd_kernel<T, V><<<grid, dim3(32, kRowsPerBlock), 0, as_stream(stream)>>>(
          as_ptr<const T>(dout), as_ptr<const T>(pre), as_ptr<T>(dpre), as_ptr<float>(partial),
          (int)m, (int)n, tanh_approx);
      check_launch(kOp, "gelu_bwd_kernel");
    });
    column_sum_kernel<T><<<(unsigned)((n + 255) / 256), 256, 0, as_stream(stream)>>>(
        as_ptr<const float>(partial), (int)parts, (int)n, as_ptr<T>(dbias));
    check_launch(kOp, "column_sum_kernel (dbias)");
  });
}

}  // namespace fastbert
