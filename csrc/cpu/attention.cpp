// fastbert._cpu: fastbert's fp32 CPU attention forward for packed variable-length sequences
// (cu_seqlens), with flash-attn's sliding window and causal mask. ATen's fused CPU attention
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
  float* lse;                  // (heads, total_q), row stride lse_head
  const int64_t* cu_q;         // (seqs + 1,) token offsets of each sequence's queries
  const int64_t* cu_k;         // and keys
  int64_t seqs, dim;
  int64_t q_tok, q_head, k_tok, k_head, v_tok, v_head, o_tok, o_head, lse_head;
  float scale;
  int64_t left, right;         // key j is visible from query i when i - left <= j <= i + right
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

void attention_varlen_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                              uintptr_t lse, uintptr_t cu_q, uintptr_t cu_k, int64_t seqs,
                              int64_t total_q, int64_t total_k,
                              int64_t heads, int64_t dim, int64_t q_tok, int64_t q_head,
                              int64_t k_tok, int64_t k_head, int64_t v_tok, int64_t v_head,
                              int64_t o_tok, int64_t o_head, int64_t lse_head, double scale,
                              int64_t left, int64_t right, int64_t threads) {
  const int which = chosen_isa.load();  // one ISA for the whole call
  const int width = width_of(which);
  if (width == 0)
    throw std::runtime_error("fastbert._cpu.attention_varlen_forward: this CPU has neither "
                             "AVX-512 nor AVX2 with FMA");
  if (dim <= 0 || dim % width != 0 || dim > 256)
    throw std::invalid_argument("fastbert._cpu.attention_varlen_forward: head_dim must be a "
                                "multiple of " + std::to_string(width) + " up to 256, got " +
                                std::to_string(dim));
  Args a{reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k),
         reinterpret_cast<const float*>(v), reinterpret_cast<float*>(out),
         reinterpret_cast<float*>(lse), reinterpret_cast<const int64_t*>(cu_q),
         reinterpret_cast<const int64_t*>(cu_k), seqs, dim, q_tok, q_head, k_tok, k_head, v_tok,
         v_head, o_tok, o_head, lse_head, static_cast<float>(scale), left, right};
  // cu_seqlens start at 0, never decrease and stay within the tensors (the op checked them
  // already; a wrong one here would read or write out of bounds)
  for (int64_t s = 0; s <= seqs; ++s) {
    const bool bad_q = a.cu_q[s] < (s ? a.cu_q[s - 1] : 0) || a.cu_q[s] > total_q ||
                       (s == seqs && a.cu_q[s] != total_q);  // every output row is written
    const bool bad_k = a.cu_k[s] < (s ? a.cu_k[s - 1] : 0) || a.cu_k[s] > total_k;
    if (bad_q || bad_k || (s == 0 && (a.cu_q[0] != 0 || a.cu_k[0] != 0)))
      throw std::invalid_argument("fastbert._cpu.attention_varlen_forward: cu_seqlens must "
                                  "start at 0, never decrease, end at the queries' count and within the keys'");
  }
  // sequence-major, then head, then row block: consecutive tasks share their K and V in cache
  constexpr int64_t rows_per_task = avx512::BM;
  static_assert(avx512::BM == avx2::BM, "both ISAs cut the same row blocks");
  std::vector<Task> tasks;
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t lq = a.cu_q[s + 1] - a.cu_q[s];
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t row0 = 0; row0 < lq; row0 += rows_per_task) tasks.push_back({s, h, row0});
  }
  const int workers = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(threads, static_cast<int64_t>(tasks.size()))));
  if (which == 2)
    avx512::run(a, tasks, workers);
  else
    avx2::run(a, tasks, workers);
}

}  // namespace fastbert_cpu

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fastbert CPU kernels (no torch: addresses, sizes and strides)";
  m.def("isa", &fastbert_cpu::isa);
  m.def("set_isa", &fastbert_cpu::set_isa);
  m.def("vector_width", &fastbert_cpu::vector_width);
  m.def("attention_varlen_forward", &fastbert_cpu::attention_varlen_forward,
        py::call_guard<py::gil_scoped_release>());
}
