// fastbert._cpu: fastbert's fp32 CPU attention forward for packed variable-length sequences
// (cu_seqlens) and for padded batches with a key-padding mask, with flash-attn's sliding window
// and causal mask. ATen's fused CPU attention
// runs its tiles on MKL's sgemm, which on AMD CPUs takes half-rate code paths; this kernel
// (attention_kernel.h) keeps its tiles in vector registers on AVX-512 or AVX2 + FMA, chosen
// at run time, threaded by OpenMP (torch's own team). No torch, as fastbert._C: tensors arrive
// as addresses, sizes and strides.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace fastbert_cpu {

struct Args {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  float* lse;
  int64_t dim;
  int64_t q_tok, q_head, k_tok, k_head, v_tok, v_head, o_tok, o_head, lse_head;
  int64_t k_extent;            // elements of k from its first: no key row is read past it
  float scale;
  int64_t left, right;         // key j is visible from query i when
                               // i + shift - left <= j <= i + shift + right
};

// One sequence: where its queries, keys, values, outputs and lse start (elements), how many
// queries and keys it has, and the diagonal's offset (bottom-right alignment, as flash-attn's:
// keys - queries, less the padding keys cut off its front).
struct Seq {
  int64_t q_off, k_off, v_off, o_off, lse_off;
  int64_t lq, lk, shift;
  const uint8_t* key_mask;     // (lk,) 1 = a real key, where padding sits between real keys
};

struct Task {
  int64_t seq, head, row0;     // query rows [row0, row0 + BM) of one sequence and head
};

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define FB_NS avx512
#define FB_W 16
#define FB_JG 12
#define FB_R 4
#include "csrc/cpu/attention_kernel.h"
#undef FB_NS
#undef FB_W
#undef FB_JG
#undef FB_R
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FB_NS avx2
#define FB_W 8
#define FB_JG 3
#define FB_R 2
#include "csrc/cpu/attention_kernel.h"
#undef FB_NS
#undef FB_W
#undef FB_JG
#undef FB_R
#pragma GCC pop_options

// The best instruction set this CPU offers the kernel ("" where neither).
std::string best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
  return "";
}

// 2: AVX-512, 1: AVX2 + FMA, 0: neither. Atomic: read by kernels running without the GIL.
std::atomic<int> chosen_isa{best_isa() == "avx512" ? 2 : best_isa() == "avx2" ? 1 : 0};

// The instruction set the kernel runs with ("" where neither is available).
std::string isa() {
  const int which = chosen_isa.load();
  return which == 2 ? "avx512" : which == 1 ? "avx2" : "";
}

// Run the kernel with `name` ("avx512", "avx2"; "" for the best): tests reach the AVX2 kernel
// on an AVX-512 CPU this way.
void set_isa(const std::string& name) {
  const std::string best = best_isa();
  if (name.empty()) {
    chosen_isa = best == "avx512" ? 2 : best == "avx2" ? 1 : 0;
  } else if ((name == "avx2" && !best.empty()) || (name == "avx512" && best == "avx512")) {
    chosen_isa = name == "avx512" ? 2 : 1;
  } else {
    throw std::invalid_argument("fastbert._cpu.set_isa: this CPU cannot run '" + name +
                                "' (best: '" + best + "')");
  }
}

// Floats per vector register of an ISA code: head_dim must be a multiple of it.
int width_of(int which) { return which == 2 ? 16 : which == 1 ? 8 : 0; }

int vector_width() { return width_of(chosen_isa.load()); }

// The ISA code this call runs with, after checking head_dim fits it.
int checked_isa(const char* op, int64_t dim) {
  const int which = chosen_isa.load();  // one ISA for the whole call
  const int width = width_of(which);
  if (width == 0)
    throw std::runtime_error(std::string(op) + ": this CPU has neither AVX-512 nor AVX2 with FMA");
  if (dim <= 0 || dim % width != 0 || dim > 256)
    throw std::invalid_argument(std::string(op) + ": head_dim must be a multiple of " +
                                std::to_string(width) + " up to 256, got " + std::to_string(dim));
  return which;
}

// Sequence-major, then head, then row block: consecutive tasks share their K and V in cache.
void launch(int which, const Args& a, const std::vector<Seq>& seqs, int64_t heads,
            int64_t threads) {
  constexpr int64_t rows_per_task = avx512::BM;
  static_assert(avx512::BM == avx2::BM, "both ISAs cut the same row blocks");
  std::vector<Task> tasks;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t row0 = 0; row0 < seqs[s].lq; row0 += rows_per_task) tasks.push_back({s, h, row0});
  const int workers = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(threads, static_cast<int64_t>(tasks.size()))));
  if (which == 2)
    avx512::run(a, seqs, tasks, workers);
  else
    avx2::run(a, seqs, tasks, workers);
}

// q (total_q, heads, dim), k and v (total_k, heads, dim) at the given strides; sequence s is
// rows cu_q[s]:cu_q[s+1] of q and cu_k[s]:cu_k[s+1] of k and v. out (total_q, heads, dim),
// lse (heads, total_q) with row stride lse_head.
void attention_varlen_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                              uintptr_t lse, uintptr_t cu_q_ptr, uintptr_t cu_k_ptr, int64_t seqs,
                              int64_t total_q, int64_t total_k,
                              int64_t heads, int64_t dim, int64_t q_tok, int64_t q_head,
                              int64_t k_tok, int64_t k_head, int64_t v_tok, int64_t v_head,
                              int64_t o_tok, int64_t o_head, int64_t lse_head, double scale,
                              int64_t left, int64_t right, int64_t threads) {
  const char* op = "fastbert._cpu.attention_varlen_forward";
  const int which = checked_isa(op, dim);
  const auto* cu_q = reinterpret_cast<const int64_t*>(cu_q_ptr);
  const auto* cu_k = reinterpret_cast<const int64_t*>(cu_k_ptr);
  // cu_seqlens start at 0, never decrease and stay within the tensors (the op checked them
  // already; a wrong one here would read or write out of bounds)
  for (int64_t s = 0; s <= seqs; ++s) {
    const bool bad_q = cu_q[s] < (s ? cu_q[s - 1] : 0) || cu_q[s] > total_q ||
                       (s == seqs && cu_q[s] != total_q);  // every output row is written
    const bool bad_k = cu_k[s] < (s ? cu_k[s - 1] : 0) || cu_k[s] > total_k;
    if (bad_q || bad_k || (s == 0 && (cu_q[0] != 0 || cu_k[0] != 0)))
      throw std::invalid_argument(std::string(op) + ": cu_seqlens must start at 0, never "
                                  "decrease, end at the queries' count and within the keys'");
  }
  Args a{reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k),
         reinterpret_cast<const float*>(v), reinterpret_cast<float*>(out),
         reinterpret_cast<float*>(lse), dim, q_tok, q_head, k_tok, k_head, v_tok,
         v_head, o_tok, o_head, lse_head,
         total_k > 0 ? (total_k - 1) * k_tok + (heads - 1) * k_head + dim : 0,
         static_cast<float>(scale), left, right};
  std::vector<Seq> list;
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t lq = cu_q[s + 1] - cu_q[s], lk = cu_k[s + 1] - cu_k[s];
    list.push_back({cu_q[s] * q_tok, cu_k[s] * k_tok, cu_k[s] * v_tok, cu_q[s] * o_tok, cu_q[s],
                    lq, lk, lk - lq, nullptr});
  }
  launch(which, a, list, heads, threads);
}

// q (batch, sq, heads, dim), k and v (batch, sk, heads, dim) at the given strides; key_mask
// (batch, sk) bytes at row stride mask_batch, 1 = a real key (0: no mask). out (batch, sq,
// heads, dim) and lse (batch, heads, sq), both contiguous. Each row's padding keys before its
// first real key and after its last are never visited; padding between real keys is masked.
void attention_padded_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                              uintptr_t lse, uintptr_t key_mask, int64_t mask_batch,
                              int64_t batch, int64_t sq, int64_t sk, int64_t heads, int64_t dim,
                              int64_t q_batch, int64_t q_tok, int64_t q_head, int64_t k_batch,
                              int64_t k_tok, int64_t k_head, int64_t v_batch, int64_t v_tok,
                              int64_t v_head, double scale, int64_t left, int64_t right,
                              int64_t threads) {
  const char* op = "fastbert._cpu.attention_padded_forward";
  const int which = checked_isa(op, dim);
  if (batch < 0 || sq < 0 || sk < 0 || heads <= 0)
    throw std::invalid_argument(std::string(op) + ": sizes must be nonnegative");
  Args a{reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k),
         reinterpret_cast<const float*>(v), reinterpret_cast<float*>(out),
         reinterpret_cast<float*>(lse), dim, q_tok, q_head, k_tok, k_head, v_tok,
         v_head, heads * dim, dim, sq,
         batch > 0 && sk > 0 ? (batch - 1) * k_batch + (sk - 1) * k_tok + (heads - 1) * k_head + dim
                             : 0,
         static_cast<float>(scale), left, right};
  const auto* mask = reinterpret_cast<const uint8_t*>(key_mask);
  std::vector<Seq> list;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t first = 0, end = sk, real = sk;  // the real keys' span, and how many are real
    const uint8_t* row = mask != nullptr ? mask + b * mask_batch : nullptr;
    if (row != nullptr) {
      first = sk, end = 0, real = 0;
      for (int64_t j = 0; j < sk; ++j)
        if (row[j]) {
          first = std::min(first, j);
          end = j + 1;
          ++real;
        }
      if (real == 0) first = end = 0;
    }
    list.push_back({b * q_batch, b * k_batch + first * k_tok, b * v_batch + first * v_tok,
                    b * sq * heads * dim, b * heads * sq, sq, end - first, sk - sq - first,
                    real < end - first ? row + first : nullptr});
  }
  launch(which, a, list, heads, threads);
}

}  // namespace fastbert_cpu

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fastbert CPU kernels (no torch: addresses, sizes and strides)";
  m.def("isa", &fastbert_cpu::isa);
  m.def("set_isa", &fastbert_cpu::set_isa);
  m.def("vector_width", &fastbert_cpu::vector_width);
  m.def("attention_varlen_forward", &fastbert_cpu::attention_varlen_forward,
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_padded_forward", &fastbert_cpu::attention_padded_forward,
        py::call_guard<py::gil_scoped_release>());
}
