// fastbert._cpu's fp32 add+LayerNorm, y = LayerNorm(dropout(x) + residual) over the last dim,
// forward and backward (the torch backend's on CPU). ATen's LayerNorm(x + residual) makes the
// sum in a pass of its own and, with dropout, a mask tensor drawn and stored by another; here
// one visit of each row makes all of it, dropout's mask drawn from a hash of (seed, row, column)
// in the forward and again in the backward (layer_norm_kernel.h). No torch, as attention.cpp:
// tensors arrive as addresses of contiguous fp32 (rows, cols) buffers.
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "csrc/cpu/common.h"

namespace py = pybind11;

namespace fastbert_cpu {

// Every tensor (rows, cols) contiguous fp32, weight and bias (cols,); nullptr where absent
// (residual, sum: the forward stores the pre-norm sum only when asked; dsum, dresidual).
struct NormArgs {
  const float* x;
  const float* residual;
  const float* weight;
  const float* bias;
  float* y;
  float* sum;
  float* mean;
  float* rstd;
  const float* dy;
  const float* dsum;
  float* dx;
  float* dresidual;
  int64_t rows, cols;
  float eps;
  uint64_t seed;
  uint32_t drop_threshold;  // an element is kept when its hash is >= this (0: no dropout)
  float drop_scale;
};

constexpr int64_t ROWS_PER_BLOCK = 32;  // rows per task

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define FB_NS avx512
#include "csrc/cpu/layer_norm_kernel.h"
#undef FB_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FB_NS avx2
#include "csrc/cpu/layer_norm_kernel.h"
#undef FB_NS
#pragma GCC pop_options

// Threads for `rows` rows of `cols`: one for small calls (waking the team costs more than
// their work), else up to one per block of rows.
int norm_workers(int64_t threads, int64_t rows, int64_t cols) {
  constexpr int64_t elements_per_thread = 16384;
  const int64_t blocks = (rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
  const int64_t by_work = std::max<int64_t>(1, rows * cols / elements_per_thread);
  return static_cast<int>(std::max<int64_t>(1, std::min({threads, blocks, by_work})));
}

// The arguments both directions read: x, residual (0: none), weight, mean and rstd at their
// addresses, after checking the sizes and dropout_p.
NormArgs norm_args(const std::string& op, uintptr_t x, uintptr_t residual, uintptr_t weight,
                   uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t cols, double dropout_p,
                   uint64_t seed) {
  if (rows < 0 || cols < 1 || cols > (int64_t{1} << 30))
    throw std::invalid_argument(op + ": expected rows >= 0 and 1 <= cols <= 2^30, got " +
                                std::to_string(rows) + " and " + std::to_string(cols));
  NormArgs a{};
  a.x = at<const float>(x);
  a.residual = at<const float>(residual);
  a.weight = at<const float>(weight);
  a.mean = at<float>(mean);
  a.rstd = at<float>(rstd);
  a.rows = rows;
  a.cols = cols;
  a.seed = seed;
  a.drop_threshold = drop_threshold(dropout_p);
  a.drop_scale = drop_scale(a.drop_threshold);
  return a;
}

// x, residual (0: none), y, sum (0: not stored) (rows, cols); weight, bias (cols,); mean and
// rstd (rows,).
void add_layer_norm_forward(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias,
                            uintptr_t y, uintptr_t sum, uintptr_t mean, uintptr_t rstd,
                            int64_t rows, int64_t cols, double eps, double dropout_p,
                            uint64_t seed, int64_t threads) {
  const std::string op = "fastbert._cpu.add_layer_norm_forward";
  const int which = isa_for(op);
  NormArgs a = norm_args(op, x, residual, weight, mean, rstd, rows, cols, dropout_p, seed);
  a.bias = at<const float>(bias);
  a.y = at<float>(y);
  a.sum = at<float>(sum);
  a.eps = static_cast<float>(eps);
  const int n = norm_workers(threads, rows, cols);
  if (which == 2)
    avx512::forward(a, n);
  else
    avx2::forward(a, n);
}

// The backward of add_layer_norm_forward from its mean and rstd: dy, dsum (0: none; the
// gradient reaching a stored sum), dx, dresidual (0 where there is no residual) (rows, cols);
// dweight and dbias (cols,).
void add_layer_norm_backward(uintptr_t dy, uintptr_t dsum, uintptr_t x, uintptr_t residual,
                             uintptr_t weight, uintptr_t mean, uintptr_t rstd, uintptr_t dx,
                             uintptr_t dresidual, uintptr_t dweight, uintptr_t dbias,
                             int64_t rows, int64_t cols, double dropout_p, uint64_t seed,
                             int64_t threads) {
  const std::string op = "fastbert._cpu.add_layer_norm_backward";
  const int which = isa_for(op);
  NormArgs a = norm_args(op, x, residual, weight, mean, rstd, rows, cols, dropout_p, seed);
  a.dy = at<const float>(dy);
  a.dsum = at<const float>(dsum);
  a.dx = at<float>(dx);
  a.dresidual = at<float>(dresidual);
  if ((residual == 0) != (dresidual == 0))
    throw std::invalid_argument(op + ": dresidual is written exactly when there is a residual");
  const int n = norm_workers(threads, rows, cols);
  std::vector<double> sums(2 * cols * n, 0.0);  // allocated before the team starts
  if (which == 2)
    avx512::backward(a, at<float>(dweight), at<float>(dbias), n, sums.data());
  else
    avx2::backward(a, at<float>(dweight), at<float>(dbias), n, sums.data());
}

// add_layer_norm's dropout keep mask (rows, cols) bytes, 1 = kept, for `seed`: the one the
// kernels above draw.
void add_layer_norm_keep_mask(uintptr_t keep, int64_t rows, int64_t cols, double dropout_p,
                              uint64_t seed, int64_t threads) {
  const std::string op = "fastbert._cpu.add_layer_norm_keep_mask";
  const int which = isa_for(op);
  const NormArgs a = norm_args(op, 0, 0, 0, 0, 0, rows, cols, dropout_p, seed);
  const int n = norm_workers(threads, rows, cols);
  if (which == 2)
    avx512::keep_mask(a, at<uint8_t>(keep), n);
  else
    avx2::keep_mask(a, at<uint8_t>(keep), n);
}

void register_layer_norm(py::module_& m) {
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("add_layer_norm_forward", &add_layer_norm_forward, release);
  m.def("add_layer_norm_backward", &add_layer_norm_backward, release);
  m.def("add_layer_norm_keep_mask", &add_layer_norm_keep_mask, release);
}

}  // namespace fastbert_cpu
