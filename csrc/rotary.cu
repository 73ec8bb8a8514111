// Host launcher of the rotary kernel (kernels/rotary.cuh), forward and backward (conjugate).
#include <algorithm>
#include <string>
#include <type_traits>

#include "csrc/common.h"
#include "csrc/launchers.h"
#include "kernels/rotary.cuh"

namespace fastbert {
namespace {

constexpr const char* kOp = "fastbert.apply_rotary";

std::string str(int64_t v) { return std::to_string(v); }

// T: x's element type, C: the cos / sin tables' (T or fp32).
template <typename T, typename C>
void launch(uintptr_t x, uintptr_t cos_table, uintptr_t sin_table, uintptr_t positions,
            uintptr_t out, int64_t rows, int64_t heads, int64_t head_dim, int64_t half,
            int64_t table_rows, int64_t row_stride, int64_t head_stride, bool interleaved,
            bool conjugate, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // vectorised: P pairs per item fill one 16-byte access (interleaved: both halves of a pair in it)
  const int pairs = interleaved ? kVec / 2 : kVec;
  const bool vectorised = half % pairs == 0 && head_dim % kVec == 0 && row_stride % kVec == 0 &&
                          head_stride % kVec == 0 && x % 16 == 0 && out % 16 == 0 &&
                          cos_table % (pairs * sizeof(C)) == 0 &&
                          sin_table % (pairs * sizeof(C)) == 0;
  auto run = [&](auto pairs_tag, auto width_tag, auto interleaved_tag) {
    constexpr int P = decltype(pairs_tag)::value, W = decltype(width_tag)::value;
    constexpr bool kInterleaved = decltype(interleaved_tag)::value;
    const int64_t items = rows * heads * (half / P + (head_dim - 2 * half) / W);
    const int threads = 256;
    const int64_t blocks = std::max<int64_t>(
        1, std::min<int64_t>((items + threads - 1) / threads, (int64_t)sm_count(kOp) * 16));
    rotary_kernel<T, C, P, W, kInterleaved><<<(unsigned)blocks, threads, 0, stream>>>(
        as_ptr<const T>(x), as_ptr<const C>(cos_table), as_ptr<const C>(sin_table),
        as_ptr<const int64_t>(positions), as_ptr<T>(out), rows, (int)heads, (int)head_dim,
        (int)half, table_rows, row_stride, head_stride, conjugate);
    check_launch(kOp, "rotary_kernel");
  };
  using One = std::integral_constant<int, 1>;
  using Wide = std::integral_constant<int, kVec>;
  using Half = std::integral_constant<int, kVec / 2>;
  if (interleaved) {
    if (vectorised) run(Half{}, Wide{}, std::true_type{});
    else run(One{}, One{}, std::true_type{});
  } else {
    if (vectorised) run(Wide{}, Wide{}, std::false_type{});
    else run(One{}, One{}, std::false_type{});
  }
}

}  // namespace

void apply_rotary(uintptr_t x, uintptr_t cos_table, uintptr_t sin_table, uintptr_t positions,
                  uintptr_t out, int64_t rows, int64_t heads, int64_t head_dim, int64_t half,
                  int64_t table_rows, int64_t row_stride, int64_t head_stride, bool interleaved,
                  bool conjugate, int dtype, int table_dtype, uintptr_t stream) {
  require_device(kOp);
  check_arg(rows >= 0, kOp, "rows must be >= 0, got " + str(rows));
  check_arg(heads >= 1 && head_dim >= 1 && heads * head_dim <= INT32_MAX, kOp,
            "heads and head dim must be >= 1 with heads * head dim < 2^31, got " + str(heads) +
                " and " + str(head_dim));
  check_arg(half >= 1 && 2 * half <= head_dim, kOp,
            "rotary half-dim (cos.shape[1]) must be in [1, head dim / 2], got " + str(half) +
                " for head dim " + str(head_dim));
  check_arg(table_rows >= 1, kOp, "cos / sin need >= 1 position, got " + str(table_rows));
  check_arg(row_stride >= 0 && head_stride >= 0, kOp,
            "x strides must be >= 0, got (" + str(row_stride) + ", " + str(head_stride) + ")");
  check_arg(table_dtype == dtype || table_dtype == kFloat32, kOp,
            "cos / sin must be x's dtype or float32 (dtype code " + str(table_dtype) +
                " for x's " + str(dtype) + ")");
  if (rows == 0) return;
  dispatch_float(dtype, kOp, [&](auto t) {
    using T = decltype(t);
    auto go = [&](auto c) {
      launch<T, decltype(c)>(x, cos_table, sin_table, positions, out, rows, heads, head_dim,
                             half, table_rows, row_stride, head_stride, interleaved, conjugate,
                             as_stream(stream));
    };
    if (table_dtype == kFloat32) go(float{});
    else go(T{});
  });
}

}  // namespace fastbert
