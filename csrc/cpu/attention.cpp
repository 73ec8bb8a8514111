// fastbert._cpu: fastbert's fp32 CPU attention, forward and backward, for packed
// variable-length sequences (cu_seqlens) and for padded batches with a key-padding mask, with
// flash-attn's sliding window and causal mask. ATen's fused CPU attention
// runs its tiles on MKL's sgemm, which on AMD CPUs takes half-rate code paths; this kernel
// (attention_kernel.h) keeps its tiles in vector registers on AVX-512 or AVX2 + FMA, chosen
// at run time, threaded by OpenMP (torch's own team). No torch, as fastbert._C: tensors arrive
// as addresses, sizes and strides.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "csrc/cpu/common.h"

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
  float* out;                  // (tokens, heads, dim) contiguous; dq too
  const float* lse;            // (heads, tokens) per sequence (lse_off, lse_head); delta too
  float* lse_out;
  int64_t dim;
  int64_t q_tok, q_head, k_tok, k_head, v_tok, v_head, o_tok, o_head, lse_head;
  int64_t q_extent, k_extent, v_extent;  // elements from each tensor's first: no row is read
                                         // past them
  float scale;
  int64_t left, right;         // key j is visible from query i when
                               // i + shift - left <= j <= i + shift + right
  // dropout on the probabilities: an element is kept when its 32-bit hash (of seed, sequence,
  // head, query and key) is >= drop_threshold (0: no dropout), then scaled by drop_scale
  uint64_t seed;
  uint32_t drop_threshold;
  float drop_scale;
  int64_t heads;
};

// The backward's other tensors: dO read as q is, delta = rowsum(dO * O) laid out as lse, dQ as
// out, dK and dV (tokens, heads, dim) contiguous.
struct Grads {
  const float* dout;
  const float* delta;
  float* dq;
  float* dk;
  float* dv;
  int64_t do_tok, do_head, do_extent;
};

// One sequence: where its queries, keys, values, outputs, lse, dO and dK/dV start (elements),
// how many queries and keys it has, and the diagonal's offset (bottom-right alignment, as
// flash-attn's: keys - queries, less the padding keys cut off its front).
struct Seq {
  int64_t q_off, k_off, v_off, o_off, lse_off, do_off, dkv_off;
  int64_t lq, lk, shift;
  const uint8_t* key_mask;     // (lk,) 1 = a real key, where padding sits between real keys
  int64_t index, key0, key_stride;  // dropout's counter for query i, key j (from 0 here):
                                    // i * key_stride + key0 + j in sequence `index`

  // The window's edges (Args::left, right; -1: none): query i sees keys [key_begin, key_end),
  // key j is seen by queries [query_begin, query_end). Both grow with i (j).
  int64_t key_begin(const Args& a, int64_t i) const {
    return a.left < 0 ? 0 : std::max<int64_t>(0, i + shift - a.left);
  }
  int64_t key_end(const Args& a, int64_t i) const {
    return a.right < 0 ? lk : std::min<int64_t>(lk, i + shift + a.right + 1);
  }
  int64_t query_begin(const Args& a, int64_t j) const {
    return a.right < 0 ? 0 : std::max<int64_t>(0, j - shift - a.right);
  }
  int64_t query_end(const Args& a, int64_t j) const {
    return a.left < 0 ? lq : std::min<int64_t>(lq, j - shift + a.left + 1);
  }
};

struct Task {
  int64_t seq, head, row0;     // rows [row0, row0 + BM) of one sequence and head: queries (the
                               // forward, dQ) or keys (dK, dV)
};

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define FB_NS avx512
#define FB_W 16
#define FB_JG 12
#define FB_R 4
#include "csrc/cpu/attention_kernel.h"
#include "csrc/cpu/attention_backward.h"
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
#include "csrc/cpu/attention_backward.h"
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

int isa_for(const std::string& op) {
  const int which = chosen_isa.load();  // one ISA for the whole call
  if (which == 0) throw std::runtime_error(op + ": this CPU has neither AVX-512 nor AVX2 with FMA");
  return which;
}

// The ISA code this call runs with, after checking head_dim fits it.
int checked_isa(const std::string& op, int64_t dim) {
  const int which = isa_for(op);
  const int width = width_of(which);
  if (dim <= 0 || dim % width != 0 || dim > 256)
    throw std::invalid_argument(op + ": head_dim must be a multiple of " + std::to_string(width) +
                                " up to 256, got " + std::to_string(dim));
  return which;
}

// The hash threshold that drops a fraction dropout_p of the elements (0: keeps every one).
uint32_t drop_threshold(double dropout_p) {
  if (!(dropout_p >= 0.0 && dropout_p < 1.0))
    throw std::invalid_argument("fastbert._cpu: dropout_p must be in [0, 1), got " +
                                std::to_string(dropout_p));
  return static_cast<uint32_t>(std::min(4294967295.0, std::round(dropout_p * 4294967296.0)));
}

float drop_scale(uint32_t threshold) {
  return static_cast<float>(4294967296.0 / (4294967296.0 - threshold));
}

// The elements a (batch,) rows, heads, dim view spans from its first: the bound no read passes.
int64_t extent(int64_t batch, int64_t batch_stride, int64_t rows, int64_t tok, int64_t heads,
               int64_t head, int64_t dim) {
  if (batch == 0 || rows == 0) return 0;
  return (batch - 1) * batch_stride + (rows - 1) * tok + (heads - 1) * head + dim;
}

// Strides in elements: (token, head) for packed tensors, (batch, token, head) for padded ones.
using Strides = std::vector<int64_t>;

// (batch, token, head) strides of a packed tensor's (token, head): one batch row.
Strides as_batched(const Strides& st) { return {0, st[0], st[1]}; }

// The kernel's arguments for q, k, v at (batch, token, head) strides, `batch` rows of rows_q
// queries and rows_k keys (packed: one); out and dQ/dK/dV contiguous, lse rows of lse_head.
Args make_args(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse_in,
               uintptr_t lse_out, int64_t batch, int64_t rows_q, int64_t rows_k, int64_t heads,
               int64_t dim, const Strides& qs, const Strides& ks, const Strides& vs,
               int64_t lse_head, double scale, int64_t left, int64_t right, double dropout_p,
               uint64_t seed) {
  return Args{at<const float>(q), at<const float>(k), at<const float>(v), at<float>(out),
              at<const float>(lse_in), at<float>(lse_out), dim,
              qs[1], qs[2], ks[1], ks[2], vs[1], vs[2], heads * dim, dim, lse_head,
              extent(batch, qs[0], rows_q, qs[1], heads, qs[2], dim),
              extent(batch, ks[0], rows_k, ks[1], heads, ks[2], dim),
              extent(batch, vs[0], rows_k, vs[1], heads, vs[2], dim),
              static_cast<float>(scale), left, right, seed, drop_threshold(dropout_p),
              drop_scale(drop_threshold(dropout_p)), heads};
}

void expect_strides(const std::string& op, const Strides& st, size_t n) {
  if (st.size() != n)
    throw std::invalid_argument(op + ": expected " + std::to_string(n) + " strides per tensor");
}

// The sequences of a packed batch. cu_seqlens start at 0, never decrease and stay within the
// tensors (the op checked them already; a wrong one here would read or write out of bounds).
std::vector<Seq> packed_sequences(const std::string& op, uintptr_t cu_q_ptr, uintptr_t cu_k_ptr,
                                  int64_t seqs, int64_t total_q, int64_t total_k, int64_t row,
                                  const Strides& q, const Strides& k, const Strides& v,
                                  int64_t do_tok) {
  const auto* cu_q = at<const int64_t>(cu_q_ptr);
  const auto* cu_k = at<const int64_t>(cu_k_ptr);
  for (int64_t s = 0; s <= seqs; ++s) {
    const bool bad_q = cu_q[s] < (s ? cu_q[s - 1] : 0) || cu_q[s] > total_q ||
                       (s == seqs && cu_q[s] != total_q);  // every output row is written
    const bool bad_k = cu_k[s] < (s ? cu_k[s - 1] : 0) || cu_k[s] > total_k;
    if (bad_q || bad_k || (s == 0 && (cu_q[0] != 0 || cu_k[0] != 0)))
      throw std::invalid_argument(op + ": cu_seqlens must start at 0, never decrease, end at "
                                  "the queries' count and within the keys'");
  }
  std::vector<Seq> list;
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t lq = cu_q[s + 1] - cu_q[s], lk = cu_k[s + 1] - cu_k[s];
    list.push_back({cu_q[s] * q[0], cu_k[s] * k[0], cu_k[s] * v[0], cu_q[s] * row, cu_q[s],
                    cu_q[s] * do_tok, cu_k[s] * row, lq, lk, lk - lq, nullptr, s, 0, lk});
  }
  return list;
}

// The rows of a padded batch: each row's real keys' span [first, end) from its mask (bytes,
// 1 = real; 0: no mask), so the padding before and after it is never visited, and the mask
// itself where padding sits inside the span.
std::vector<Seq> padded_rows(uintptr_t key_mask, int64_t mask_batch, int64_t batch, int64_t sq,
                             int64_t sk, int64_t heads, int64_t dim, const Strides& q,
                             const Strides& k, const Strides& v, int64_t do_batch) {
  const int64_t row = heads * dim;
  const auto* mask = at<const uint8_t>(key_mask);
  std::vector<Seq> list;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t first = 0, end = sk, real = sk;
    const uint8_t* keys = mask != nullptr ? mask + b * mask_batch : nullptr;
    if (keys != nullptr) {
      first = sk, end = 0, real = 0;
      for (int64_t j = 0; j < sk; ++j)
        if (keys[j]) {
          first = std::min(first, j);
          end = j + 1;
          ++real;
        }
      if (real == 0) first = end = 0;
    }
    list.push_back({b * q[0], b * k[0] + first * k[1], b * v[0] + first * v[1], b * sq * row,
                    b * heads * sq, b * do_batch, (b * sk + first) * row, sq, end - first,
                    sk - sq - first, real < end - first ? keys + first : nullptr, b, first, sk});
  }
  return list;
}

// Tasks over rows [0, length) of every sequence and head, BM rows each, sequence-major: the
// tasks next to each other share their sequence's tensors in cache.
std::vector<Task> tasks_over(const std::vector<Seq>& seqs, int64_t heads, bool keys) {
  constexpr int64_t rows_per_task = avx512::BM;
  static_assert(avx512::BM == avx2::BM, "both ISAs cut the same row blocks");
  std::vector<Task> tasks;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t row0 = 0; row0 < (keys ? seqs[s].lk : seqs[s].lq); row0 += rows_per_task)
        tasks.push_back({s, h, row0});
  return tasks;
}

int workers(int64_t threads, size_t tasks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
}

void forward(int which, const Args& a, const std::vector<Seq>& seqs, int64_t heads,
             int64_t threads) {
  const std::vector<Task> tasks = tasks_over(seqs, heads, false);
  if (which == 2)
    avx512::run(a, seqs, tasks, workers(threads, tasks.size()));
  else
    avx2::run(a, seqs, tasks, workers(threads, tasks.size()));
}

void backward(int which, const Args& a, const Grads& g, const std::vector<Seq>& seqs,
              int64_t heads, int64_t threads) {
  const std::vector<Task> key_tasks = tasks_over(seqs, heads, true);
  const std::vector<Task> query_tasks = tasks_over(seqs, heads, false);
  const int n = workers(threads, key_tasks.size() + query_tasks.size());
  if (which == 2)
    avx512::run_backward(a, g, seqs, key_tasks, query_tasks, n);
  else
    avx2::run_backward(a, g, seqs, key_tasks, query_tasks, n);
}

// q (total_q, heads, dim), k and v (total_k, heads, dim) at strides (token, head); sequence s is
// rows cu_q[s]:cu_q[s+1] of q and cu_k[s]:cu_k[s+1] of k and v (int64). out (total_q, heads,
// dim) and lse (heads, total_q), contiguous.
void attention_varlen_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                              uintptr_t lse, uintptr_t cu_q, uintptr_t cu_k, int64_t seqs,
                              int64_t total_q, int64_t total_k, int64_t heads, int64_t dim,
                              const Strides& qs, const Strides& ks, const Strides& vs,
                              double scale, int64_t left, int64_t right, double dropout_p,
                              uint64_t seed, int64_t threads) {
  const std::string op = "fastbert._cpu.attention_varlen_forward";
  const int which = checked_isa(op, dim);
  for (const Strides* st : {&qs, &ks, &vs}) expect_strides(op, *st, 2);
  const std::vector<Seq> list = packed_sequences(op, cu_q, cu_k, seqs, total_q, total_k,
                                                 heads * dim, qs, ks, vs, 0);
  const Args a = make_args(q, k, v, out, 0, lse, 1, total_q, total_k, heads, dim,
                           as_batched(qs), as_batched(ks), as_batched(vs), total_q, scale, left,
                           right, dropout_p, seed);
  forward(which, a, list, heads, threads);
}

// The backward of attention_varlen_forward: dout read at strides (token, head); lse and
// delta = rowsum(dout * out) (heads, total_q) contiguous; dq (total_q, heads, dim), dk and dv
// (total_k, heads, dim) written whole (keys no sequence holds: zeros).
void attention_varlen_backward(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v,
                               uintptr_t lse, uintptr_t delta, uintptr_t dq, uintptr_t dk,
                               uintptr_t dv, uintptr_t cu_q, uintptr_t cu_k, int64_t seqs,
                               int64_t total_q, int64_t total_k, int64_t heads, int64_t dim,
                               const Strides& dos, const Strides& qs, const Strides& ks,
                               const Strides& vs, double scale, int64_t left, int64_t right,
                               double dropout_p, uint64_t seed, int64_t threads) {
  const std::string op = "fastbert._cpu.attention_varlen_backward";
  const int which = checked_isa(op, dim);
  for (const Strides* st : {&dos, &qs, &ks, &vs}) expect_strides(op, *st, 2);
  const std::vector<Seq> list = packed_sequences(op, cu_q, cu_k, seqs, total_q, total_k,
                                                 heads * dim, qs, ks, vs, dos[0]);
  const Args a = make_args(q, k, v, 0, lse, 0, 1, total_q, total_k, heads, dim,
                           as_batched(qs), as_batched(ks), as_batched(vs), total_q, scale, left,
                           right, dropout_p, seed);
  const Grads g{at<const float>(dout), at<const float>(delta), at<float>(dq), at<float>(dk),
                at<float>(dv), dos[0], dos[1], extent(1, 0, total_q, dos[0], heads, dos[1], dim)};
  const int64_t covered = at<const int64_t>(cu_k)[seqs] * heads * dim;
  std::fill(g.dk + covered, g.dk + total_k * heads * dim, 0.0f);
  std::fill(g.dv + covered, g.dv + total_k * heads * dim, 0.0f);
  backward(which, a, g, list, heads, threads);
}

// q (batch, sq, heads, dim), k and v (batch, sk, heads, dim) at strides (batch, token, head);
// key_mask (batch, sk) bytes at row stride mask_batch, 1 = a real key (0: no mask). out (batch,
// sq, heads, dim) and lse (batch, heads, sq), contiguous.
void attention_padded_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                              uintptr_t lse, uintptr_t key_mask, int64_t mask_batch,
                              int64_t batch, int64_t sq, int64_t sk, int64_t heads, int64_t dim,
                              const Strides& qs, const Strides& ks, const Strides& vs,
                              double scale, int64_t left, int64_t right, double dropout_p,
                              uint64_t seed, int64_t threads) {
  const std::string op = "fastbert._cpu.attention_padded_forward";
  const int which = checked_isa(op, dim);
  for (const Strides* st : {&qs, &ks, &vs}) expect_strides(op, *st, 3);
  const std::vector<Seq> list = padded_rows(key_mask, mask_batch, batch, sq, sk, heads, dim,
                                            qs, ks, vs, 0);
  const Args a = make_args(q, k, v, out, 0, lse, batch, sq, sk, heads, dim, qs, ks, vs, sq,
                           scale, left, right, dropout_p, seed);
  forward(which, a, list, heads, threads);
}

// The backward of attention_padded_forward: dout at strides (batch, token, head); lse and delta
// (batch, heads, sq) contiguous; dq (batch, sq, heads, dim), dk and dv (batch, sk, heads, dim)
// contiguous, dk and dv zeroed by the caller (padding keys outside a row's span are not written).
void attention_padded_backward(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v,
                               uintptr_t lse, uintptr_t delta, uintptr_t dq, uintptr_t dk,
                               uintptr_t dv, uintptr_t key_mask, int64_t mask_batch,
                               int64_t batch, int64_t sq, int64_t sk, int64_t heads, int64_t dim,
                               const Strides& dos, const Strides& qs, const Strides& ks,
                               const Strides& vs, double scale, int64_t left, int64_t right,
                               double dropout_p, uint64_t seed, int64_t threads) {
  const std::string op = "fastbert._cpu.attention_padded_backward";
  const int which = checked_isa(op, dim);
  for (const Strides* st : {&dos, &qs, &ks, &vs}) expect_strides(op, *st, 3);
  const std::vector<Seq> list = padded_rows(key_mask, mask_batch, batch, sq, sk, heads, dim,
                                            qs, ks, vs, dos[0]);
  const Args a = make_args(q, k, v, 0, lse, 0, batch, sq, sk, heads, dim, qs, ks, vs, sq,
                           scale, left, right, dropout_p, seed);
  const Grads g{at<const float>(dout), at<const float>(delta), at<float>(dq), at<float>(dk),
                at<float>(dv), dos[1], dos[2],
                extent(batch, dos[0], sq, dos[1], heads, dos[2], dim)};
  backward(which, a, g, list, heads, threads);
}

}  // namespace fastbert_cpu

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fastbert CPU kernels (no torch: addresses, sizes and strides)";
  m.def("isa", &fastbert_cpu::isa);
  m.def("set_isa", &fastbert_cpu::set_isa);
  m.def("vector_width", &fastbert_cpu::vector_width);
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("attention_varlen_forward", &fastbert_cpu::attention_varlen_forward, release);
  m.def("attention_varlen_backward", &fastbert_cpu::attention_varlen_backward, release);
  m.def("attention_padded_forward", &fastbert_cpu::attention_padded_forward, release);
  m.def("attention_padded_backward", &fastbert_cpu::attention_padded_backward, release);
  fastbert_cpu::register_layer_norm(m);
}
