// Host launchers for residual add + LayerNorm (kernels/layer_norm.cuh).
#include <algorithm>
#include <type_traits>

#include "csrc/common.h"
#include "csrc/launchers.h"
#include "kernels/layer_norm.cuh"

namespace fastbert {
namespace {

constexpr const char* kOp = "fastbert.add_layer_norm";
constexpr int64_t kMaxHidden = 4096;  // backward keeps 2 * hidden fp32 sums in shared memory
constexpr int64_t kWarpModeMaxHidden = 1024;
constexpr int kRowsPerWarpBlock = 4;

struct Config {
  dim3 block;
  int64_t row_groups;  // blocks needed to give every row its own row group
};

Config choose_config(int64_t rows, int64_t hidden, int vec) {
  if (hidden <= kWarpModeMaxHidden)
    return {dim3(32, kRowsPerWarpBlock), (rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock};
  const int64_t vectors = (hidden + vec - 1) / vec;
  const int threads = (int)std::min<int64_t>(1024, (vectors + 31) / 32 * 32);
  return {dim3(threads, 1), rows};
}

void check_shapes(int64_t rows, int64_t hidden, int dtype, int weight_dtype) {
  check_arg(rows >= 0 && rows <= INT32_MAX, kOp, "rows must be in [0, 2^31), got " +
                                                     std::to_string(rows));
  check_arg(hidden >= 1 && hidden <= kMaxHidden, kOp,
            "the CUDA kernel supports hidden sizes 1.." + std::to_string(kMaxHidden) + ", got " +
                std::to_string(hidden));
  check_arg(weight_dtype == dtype || weight_dtype == kFloat32, kOp,
            "weight dtype must equal x's dtype or be float32");
}

void check_dropout(double p) {
  check_arg(p >= 0.0 && p < 1.0, kOp, "dropout_p must be in [0, 1), got " + std::to_string(p));
}

// Runs f(dropout, sum) with both flags as std::bool_constant (the variants are separate
// instantiations): dropout when p > 0, sum when the pre-norm sum's pointer is not null.
template <typename F> void dispatch_flags(double p, const void* sum, F&& f) {
  auto with_sum = [&](auto drop) {
    if (sum) {
      f(drop, std::true_type{});
    } else {
      f(drop, std::false_type{});
    }
  };
  if (p > 0.0) {
    with_sum(std::true_type{});
  } else {
    with_sum(std::false_type{});
  }
}

template <typename T, typename W, int VEC>
void launch_forward(const T* x, const T* residual, const W* weight, const W* bias, T* y,
                    T* sum, float* mean, float* rstd, int64_t rows, int64_t hidden, float eps,
                    double dropout_p, uint64_t seed, cudaStream_t stream) {
  const Config cfg = choose_config(rows, hidden, VEC);
  const size_t smem = (cfg.block.y * hidden + 32) * sizeof(float);
  const DropoutParams dropout = make_dropout(dropout_p, seed);
  dispatch_flags(dropout_p, sum, [&](auto drop, auto store_sum) {
    add_layer_norm_fwd_kernel<T, W, VEC, decltype(drop)::value, decltype(store_sum)::value>
        <<<(unsigned)cfg.row_groups, cfg.block, smem, stream>>>(
            x, residual, weight, bias, y, sum, mean, rstd, (int)rows, (int)hidden, eps,
            dropout);
  });
  check_launch(kOp, "add_layer_norm_fwd_kernel");
}

template <typename T, typename W, int VEC>
void launch_backward(const T* dy, const T* dsum, const T* x, const T* residual,
                     const W* weight, const float* mean, const float* rstd, T* dx, T* dresidual,
                     float* partial, W* dweight, W* dbias, int64_t rows, int64_t hidden,
                     int64_t parts, double dropout_p, uint64_t seed, cudaStream_t stream) {
  const Config cfg = choose_config(rows, hidden, VEC);
  const size_t smem = (2 * cfg.block.y * hidden + 32) * sizeof(float);
  float* partial_dw = partial;
  float* partial_db = partial + parts * hidden;
  const DropoutParams dropout = make_dropout(dropout_p, seed);
  dispatch_flags(dropout_p, dsum, [&](auto drop, auto add_dsum) {
    add_layer_norm_bwd_kernel<T, W, VEC, decltype(drop)::value, decltype(add_dsum)::value>
        <<<(unsigned)parts, cfg.block, smem, stream>>>(dy, dsum, x, residual, weight, mean, rstd,
                                                       dx, dresidual, partial_dw, partial_db,
                                                       (int)rows, (int)hidden, dropout);
  });
  check_launch(kOp, "add_layer_norm_bwd_kernel");
  const unsigned col_blocks = (unsigned)((hidden + 255) / 256);
  column_sum_kernel<W><<<col_blocks, 256, 0, stream>>>(partial_dw, (int)parts, (int)hidden,
                                                       dweight);
  check_launch(kOp, "column_sum_kernel (dweight)");
  column_sum_kernel<W><<<col_blocks, 256, 0, stream>>>(partial_db, (int)parts, (int)hidden,
                                                       dbias);
  check_launch(kOp, "column_sum_kernel (dbias)");
}

// Calls f(T{}, W{}) for x's element type T and the weight's element type W (T or float).
template <typename F> void dispatch_types(int dtype, int weight_dtype, F&& f) {
  dispatch_float(dtype, kOp, [&](auto t) {
    using T = decltype(t);
    if (weight_dtype == kFloat32) {
      f(t, float{});
    } else {
      f(t, T{});
    }
  });
}

}  // namespace

void add_layer_norm_forward(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias,
                            uintptr_t y, uintptr_t sum, uintptr_t mean, uintptr_t rstd,
                            int64_t rows, int64_t hidden, double eps, double dropout_p,
                            uint64_t seed, int dtype, int weight_dtype, uintptr_t stream) {
  require_device(kOp);
  check_shapes(rows, hidden, dtype, weight_dtype);
  check_dropout(dropout_p);
  if (rows == 0) return;
  dispatch_types(dtype, weight_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    by_width<T>(hidden, {x, residual, y, sum}, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      launch_forward<T, W, V>(as_ptr<const T>(x), as_ptr<const T>(residual),
                              as_ptr<const W>(weight), as_ptr<const W>(bias), as_ptr<T>(y),
                              as_ptr<T>(sum), as_ptr<float>(mean), as_ptr<float>(rstd), rows,
                              hidden, (float)eps, dropout_p, seed, as_stream(stream));
    });
  });
}

int64_t add_layer_norm_backward_parts(int64_t rows, int64_t hidden) {
  require_device(kOp);
  const int64_t groups = hidden <= kWarpModeMaxHidden
                             ? (rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock
                             : rows;
  return std::max<int64_t>(1, std::min<int64_t>(groups, 2 * sm_count(kOp)));
}

void add_layer_norm_backward(uintptr_t dy, uintptr_t dsum, uintptr_t x, uintptr_t residual,
                             uintptr_t weight, uintptr_t mean, uintptr_t rstd, uintptr_t dx,
                             uintptr_t dresidual, uintptr_t partial, uintptr_t dweight,
                             uintptr_t dbias, int64_t rows, int64_t hidden, int64_t parts,
                             double dropout_p, uint64_t seed, int dtype, int weight_dtype,
                             uintptr_t stream) {
  require_device(kOp);
  check_shapes(rows, hidden, dtype, weight_dtype);
  check_dropout(dropout_p);
  check_arg(parts >= 1 && parts <= 65535, kOp,
            "partial-sum block count must be in [1, 65535], got " + std::to_string(parts));
  dispatch_types(dtype, weight_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    by_width<T>(hidden, {dy, dsum, x, residual, dx, dresidual}, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      launch_backward<T, W, V>(as_ptr<const T>(dy), as_ptr<const T>(dsum), as_ptr<const T>(x),
                               as_ptr<const T>(residual), as_ptr<const W>(weight),
                               as_ptr<const float>(mean), as_ptr<const float>(rstd),
                               as_ptr<T>(dx), as_ptr<T>(dresidual), as_ptr<float>(partial),
                               as_ptr<W>(dweight), as_ptr<W>(dbias), rows, hidden, parts,
                               dropout_p, seed, as_stream(stream));
    });
  });
}

}  // namespace fastbert
