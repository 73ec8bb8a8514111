// The fp32 add+LayerNorm rows of fastbert._cpu for one instruction set: layer_norm.cpp includes
// this file once per ISA under `#pragma GCC target(...)`, with FB_NS (namespace) defined.
//
// A row's pre-norm sum s = dropout(x) + residual, its mean and variance, and y are made in one
// visit of the row (it stays in L1 between the loops); the backward recomputes s from x and
// the residual as the forward made it (dropout's mask included, from the hash) rather than
// keeping it, and takes both of its row reductions and the dweight/dbias terms in one loop.
// The loops are `omp simd` loops over a row: the work is memory-bound, the compiler's vectors
// of this ISA are enough. Each flag (dropout, residual, a gradient for the sum) is a template
// argument, so no loop tests one per element.
namespace FB_NS {

#include "csrc/cpu/hash.h"

// Dropout's factor for element j of the row with `stream`: scale where kept, 0 where dropped.
// Locals and 32-bit lanes in the loops (a row's index j is an int): the hash then vectorizes
// with 16 lanes per AVX-512 register, not 8 of int64.
struct Keep {
  uint32_t stream, threshold;
  float scale;
  float operator()(int j) const {
    const uint32_t hash = fmix(static_cast<uint32_t>(j) * 0x9E3779B1u ^ stream);
    return hash >= threshold ? scale : 0.0f;
  }
};

static inline Keep keep_of(const NormArgs& a, uint32_t stream) {
  return Keep{stream, a.drop_threshold, a.drop_scale};
}

static inline uint32_t row_stream(const NormArgs& a, int64_t r) {
  return seed_stream(a.seed, static_cast<uint32_t>(r) * 0x9E3779B9u ^
                                 static_cast<uint32_t>(static_cast<uint64_t>(r) >> 32));
}

// Rows [begin, end): y, mean and rstd, and the sum itself where a.sum is set.
template <bool DROP, bool RES>
static void forward_rows(const NormArgs& a, int64_t begin, int64_t end) {
  const int n = static_cast<int>(a.cols);  // < 2^31: norm_args checks
  const float* w = a.weight;
  const float* b = a.bias;
  for (int64_t r = begin; r < end; ++r) {
    const float* x = a.x + r * n;
    float* y = a.y + r * n;
    const float* s = x;
    if (DROP || RES || a.sum != nullptr) {  // s into the sum's row, or y's until y replaces it
      float* out = a.sum != nullptr ? a.sum + r * n : y;
      const float* res = RES ? a.residual + r * n : nullptr;
      const Keep drop = keep_of(a, DROP ? row_stream(a, r) : 0);
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        const float kept = DROP ? x[j] * drop(j) : x[j];
        out[j] = RES ? kept + res[j] : kept;
      }
      s = out;
    }
    // the row's sums in fp64 lanes: an fp32 lane adding n / 8 terms in order lost 1e-5 of a
    // 4,096-wide row's mean; two passes, so no cancellation for rows far from 0
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (int j = 0; j < n; ++j) total += s[j];
    const float mu = static_cast<float>(total / static_cast<double>(n));
    double squares = 0.0;
#pragma omp simd reduction(+ : squares)
    for (int j = 0; j < n; ++j) squares += (s[j] - mu) * (s[j] - mu);
    const float inv = 1.0f / std::sqrt(static_cast<float>(squares / static_cast<double>(n)) +
                                       a.eps);
#pragma omp simd
    for (int j = 0; j < n; ++j) y[j] = (s[j] - mu) * inv * w[j] + b[j];
    a.mean[r] = mu;
    a.rstd[r] = inv;
  }
}

// Rows [begin, end): dx (and dresidual), their dweight and dbias terms added onto dw and db
// (fp64: a sum over every row of the batch).
// ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight, plus dsum.
template <bool DROP, bool RES, bool DSUM>
static void backward_rows(const NormArgs& a, int64_t begin, int64_t end, double* dw,
                          double* db) {
  const int n = static_cast<int>(a.cols);  // < 2^31: norm_args checks
  const float* w = a.weight;
  for (int64_t r = begin; r < end; ++r) {
    const float* x = a.x + r * n;
    const float* res = RES ? a.residual + r * n : nullptr;
    const float* dy = a.dy + r * n;
    float* dx = a.dx + r * n;  // holds xhat between the two loops
    const float mu = a.mean[r], inv = a.rstd[r];
    const Keep drop = keep_of(a, DROP ? row_stream(a, r) : 0);
    double gxhat = 0.0, gsum = 0.0;  // fp64 lanes, as the forward's sums
#pragma omp simd reduction(+ : gxhat, gsum)
    for (int j = 0; j < n; ++j) {
      const float kept = DROP ? x[j] * drop(j) : x[j];
      const float xhat = ((RES ? kept + res[j] : kept) - mu) * inv;
      const float g = dy[j] * w[j];
      dx[j] = xhat;
      gxhat += g * xhat;
      gsum += g;
      dw[j] += dy[j] * xhat;
      db[j] += dy[j];
    }
    const float c1 = static_cast<float>(gxhat / static_cast<double>(n));
    const float c2 = static_cast<float>(gsum / static_cast<double>(n));
    const float* dsum = DSUM ? a.dsum + r * n : nullptr;
    float* dres = RES ? a.dresidual + r * n : nullptr;
#pragma omp simd
    for (int j = 0; j < n; ++j) {
      const float ds = inv * (dy[j] * w[j] - c2 - dx[j] * c1) + (DSUM ? dsum[j] : 0.0f);
      if (RES) dres[j] = ds;
      dx[j] = DROP ? ds * drop(j) : ds;
    }
  }
}

// The keep mask (rows, cols) bytes, 1 = kept, the forward and backward draw: for the torch
// backend's rows the kernel does not serve (fp16, bf16, fp64), so every dtype drops alike.
static void keep_mask(const NormArgs& a, uint8_t* keep, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t r = 0; r < a.rows; ++r) {
    const Keep drop = keep_of(a, row_stream(a, r));
    uint8_t* row = keep + r * a.cols;
    const int n = static_cast<int>(a.cols);
#pragma omp simd
    for (int j = 0; j < n; ++j) row[j] = drop(j) != 0.0f;
  }
}

using ForwardRows = void (*)(const NormArgs&, int64_t, int64_t);
using BackwardRows = void (*)(const NormArgs&, int64_t, int64_t, double*, double*);

static void forward(const NormArgs& a, int threads) {
  const bool drop = a.drop_threshold != 0, res = a.residual != nullptr;
  const ForwardRows rows = drop ? (res ? forward_rows<true, true> : forward_rows<true, false>)
                                : (res ? forward_rows<false, true> : forward_rows<false, false>);
  const int64_t blocks = (a.rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t blk = 0; blk < blocks; ++blk)
    rows(a, blk * ROWS_PER_BLOCK, std::min(a.rows, (blk + 1) * ROWS_PER_BLOCK));
}

template <bool DROP, bool RES>
static BackwardRows backward_for(bool dsum) {
  return dsum ? backward_rows<DROP, RES, true> : backward_rows<DROP, RES, false>;
}

// sums: 2 * cols doubles per thread, zeroed. Each thread adds its rows' dweight/dbias terms onto
// its own fp64 sums (its rows are the same on every call: a static schedule), then the threads'
// sums are added in thread order: the same result on every call.
static void backward(const NormArgs& a, float* dweight, float* dbias, int threads,
                     double* sums) {
  const bool drop = a.drop_threshold != 0, res = a.residual != nullptr;
  const bool dsum = a.dsum != nullptr;
  const BackwardRows rows = drop ? (res ? backward_for<true, true>(dsum)
                                        : backward_for<true, false>(dsum))
                                 : (res ? backward_for<false, true>(dsum)
                                        : backward_for<false, false>(dsum));
  const int64_t n = a.cols, blocks = (a.rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    double* mine = sums + 2 * n * omp_get_thread_num();  // dweight, dbias: this thread's
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk)
      rows(a, blk * ROWS_PER_BLOCK, std::min(a.rows, (blk + 1) * ROWS_PER_BLOCK), mine,
           mine + n);
  }
  for (int t = 1; t < threads; ++t) {
#pragma omp simd
    for (int64_t j = 0; j < 2 * n; ++j) sums[j] += sums[2 * n * t + j];
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    dweight[j] = static_cast<float>(sums[j]);
    dbias[j] = static_cast<float>(sums[n + j]);
  }
}

}  // namespace FB_NS
