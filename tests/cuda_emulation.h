// Prelude of the host emulation of fastbert's CUDA code (tests/cuda_emulation.py builds it): every
// emulated translation unit (csrc/*.cu and the kernels/*.cuh they include, rewritten as
// tests/cuda_emulation.py describes) is compiled as plain C++ with this header included first.
//
// A thread of a block is a fiber (tests/cuda_emulation.cpp runs them); the CUDA built-ins, warp
// collectives, barriers and the attention kernels' PTX wrappers (ldmatrix, mma.m16n8k16, cp.async)
// are defined here from the PTX ISA. The kernels' memory accesses are instrumented
// (-fsanitize=kernel-address and -fsanitize=alignment, with the runtime's callbacks), which lets
// the runtime check global accesses against guard regions and alignment (memcheck) and shared ones
// for conflicts between barriers (racecheck); barriers reached by part of a block are reported as
// synccheck errors. With bankcheck on, the shared accesses (and ldmatrix's and cp.async's shared
// requests) are also grouped into warp instructions and their bank conflicts counted.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define FASTBERT_HOST_EMULATION

namespace emu {

// ---- implemented by tests/cuda_emulation.cpp ------------------------------------------------
extern uint3 tid, bid;
extern dim3 bdim, gdim;
int lane();
// Block-wide barrier (__syncthreads) and warp-wide ones; file and line name the call (synccheck).
void block_barrier(const char* file, int line);
void warp_sync(const char* file, int line);  // __syncwarp: orders shared accesses in the warp
// Warp collective: this lane's value in, every lane's out (all 32 lanes must take part).
const uint32_t* warp_exchange(const uint32_t* mine, int words, const char* file, int line);
// An access the instrumentation does not see (emulated instructions), checked explicitly.
void check_access(const void* p, size_t bytes, bool write);
// bankcheck: this lane's part of a shared-memory request an emulated instruction makes (kind 2
// ldmatrix, 3 cp.async), `pc` its call site; instrumented accesses are counted by themselves.
void count_shared_request(const void* p, size_t bytes, int kind, const void* pc);
void check_aligned(const void* p, size_t align, const char* what);
unsigned char* dynamic_smem();
void* static_shared(size_t bytes, size_t align, const void* key);
// cp.async: the copy is queued by the issuing thread and lands at its wait.
void queue_copy(void* dst, const void* src, int bytes, bool valid);
void commit_copies();  // closes this thread's current group of copies
// Lands this thread's copies but those of its newest `pending` committed groups (all: also the
// uncommitted ones, as cp.async.wait_all does).
void wait_copies(int pending, bool all);

struct Config {
  dim3 grid, block;
  size_t smem;
};
inline Config config(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = 0) {
  return {grid, block, smem};
}
// Runs body() as every thread of every block; records a launch error (cudaGetLastError) for a
// configuration a GPU would refuse.
cudaError_t run_grid(const void* kernel, const Config& c, void (*body)(void*), void* ctx);

template <typename F> void call_body(void* f) { (*static_cast<F*>(f))(); }

// `kernel<<<config>>>(args...)`, rewritten. Arguments convert to the parameter types once, at the
// launch, as CUDA's do; each thread gets its own copy.
template <typename... P, typename... A>
void launch(const Config& c, void (*kernel)(P...), A&&... args) {
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  auto body = [&] {
    std::tuple<std::decay_t<P>...> mine = params;
    std::apply(kernel, mine);
  };
  run_grid(reinterpret_cast<const void*>(kernel), c, call_body<decltype(body)>, &body);
}

// cudaLaunchKernel((const void*)kernel, ...), rewritten to keep the kernel's type.
template <typename... P, size_t... I>
cudaError_t launch_args(void (*kernel)(P...), const Config& c, void** args,
                        std::index_sequence<I...>) {
  std::tuple<std::decay_t<P>...> params(*static_cast<std::decay_t<P>*>(args[I])...);
  auto body = [&] {
    std::tuple<std::decay_t<P>...> mine = params;
    std::apply(kernel, mine);
  };
  return run_grid(reinterpret_cast<const void*>(kernel), c, call_body<decltype(body)>, &body);
}
template <typename... P>
cudaError_t launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, void** args, size_t smem,
                          cudaStream_t) {
  return launch_args(kernel, Config{grid, block, smem}, args, std::index_sequence_for<P...>{});
}

// `__shared__ T name[...]` inside a kernel, rewritten: one object per block for all its threads;
// `key` is unique to the declaration (and the kernel's instantiation).
template <typename T> T& shared_object(const void* key, size_t align = 16) {
  return *static_cast<T*>(static_shared(sizeof(T), std::max(align, alignof(T)), key));
}

}  // namespace emu

// cuda_runtime.h's C++ overloads, which it declares only for nvcc
template <typename T> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* entry) {
  return cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}

#define threadIdx emu::tid
#define blockIdx emu::bid
#define blockDim emu::bdim
#define gridDim emu::gdim
#define warpSize 32
#define __syncthreads() ::emu::block_barrier(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::warp_sync(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m) ::emu::shfl_xor(v, m, __FILE__, __LINE__)
#define __ballot_sync(mask, p) ::emu::ballot(p, __FILE__, __LINE__)
#define __all_sync(mask, p) (::emu::ballot(p, __FILE__, __LINE__) == 0xffffffffu)
#define __any_sync(mask, p) (::emu::ballot(p, __FILE__, __LINE__) != 0u)

namespace emu {
template <typename T> T shfl_xor(T v, int m, const char* file, int line) {
  static_assert(sizeof(T) == 4, "32-bit shuffles");
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const uint32_t* all = warp_exchange(&bits, 1, file, line);
  std::memcpy(&v, &all[lane() ^ m], 4);
  return v;
}
inline unsigned ballot(int p, const char* file, int line) {
  const uint32_t mine = p != 0;
  const uint32_t* all = warp_exchange(&mine, 1, file, line);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= all[l] << l;
  return r;
}
}  // namespace emu

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

// ---- the PTX wrappers of kernels/attention_mma.cuh, from the PTX ISA's definitions -----------
// Their own arithmetic is not a kernel's memory access: not instrumented (shared-memory reads of
// ldmatrix are checked explicitly).
#define EMU_UNCHECKED __attribute__((no_sanitize("kernel-address"), noinline))
namespace fastbert {
namespace attn {

inline uint32_t smem_addr(const void* p) {
  return (uint32_t)(static_cast<const unsigned char*>(p) - emu::dynamic_smem());
}

template <typename T> float bits_to_float(uint16_t b);
template <> inline float bits_to_float<__half>(uint16_t b) {
  __half_raw raw;
  raw.x = b;
  return __half2float(__half(raw));
}
template <> inline float bits_to_float<__nv_bfloat16>(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T> uint16_t float_to_bits(float x);
template <> inline uint16_t float_to_bits<__half>(float x) {
  return __half_raw(__float2half_rn(x)).x;
}
template <> inline uint16_t float_to_bits<__nv_bfloat16>(float x) {
  __nv_bfloat16 h = __float2bfloat16_rn(x);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
template <typename T> inline uint32_t pack2(float lo, float hi) {
  return float_to_bits<T>(lo) | (uint32_t)float_to_bits<T>(hi) << 16;
}

// Element i of the shared row at `row` (ldmatrix's own read, checked explicitly: a separate
// uninstrumented function, so that bankcheck does not count it as a kernel's access).
EMU_UNCHECKED inline uint16_t ldmatrix_element(uint32_t row, int i) {
  const unsigned char* p = emu::dynamic_smem() + row + 2 * i;
  emu::check_access(p, 2, false);
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; lane l gets element
// (l / 4, 2 (l % 4) + {0, 1}) of each (transposed: (2 (l % 4) + {0, 1}, l / 4)).
EMU_UNCHECKED inline void ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
  emu::check_aligned(emu::dynamic_smem() + addr, 16, "ldmatrix row");
  // bankcheck: the lane's 16-byte row (one x4 request: 4 matrices of 8 rows)
  emu::count_shared_request(emu::dynamic_smem() + addr, 16, 2, __builtin_return_address(0));
  const uint32_t* rows = emu::warp_exchange(&addr, 1, __FILE__, __LINE__);
  const int l = emu::lane(), g = l / 4, t = l % 4;
  auto at = ldmatrix_element;
  for (int i = 0; i < 4; ++i) {
    const uint16_t lo = trans ? at(rows[8 * i + 2 * t], g) : at(rows[8 * i + g], 2 * t);
    const uint16_t hi = trans ? at(rows[8 * i + 2 * t + 1], g) : at(rows[8 * i + g], 2 * t + 1);
    r[i] = lo | (uint32_t)hi << 16;
  }
}
// Always inlined, here and for cp.async: bankcheck names the call sites in the kernels.
#define EMU_INLINE __attribute__((always_inline)) inline
EMU_INLINE void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix(r, addr, false); }
EMU_INLINE void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix(r, addr, true); }

// mma.m16n8k16, fp32 accumulate, from all 32 lanes' fragments: A (16 x 16) element (r, c) is in
// lane (r % 8) * 4 + (c % 8) / 2, register (r >= 8) + 2 (c >= 8), half c % 2; B (16 x 8) element
// (k, n) in lane n * 4 + (k % 8) / 2, register 4 + (k >= 8), half k % 2. A lane computes its own
// C elements (rows g, g + 8; columns 2t, 2t + 1): it reads only those rows of A, columns of B.
template <typename T>
EMU_UNCHECKED inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const uint32_t* all = emu::warp_exchange(mine, 6, __FILE__, __LINE__);
  auto half = [](uint32_t x, int odd) { return bits_to_float<T>(odd ? x >> 16 : x & 0xffff); };
  const int g = emu::lane() / 4, t = emu::lane() % 4;
  float A[2][16], B[16][2];
  for (int k = 0; k < 16; ++k) {
    for (int i = 0; i < 2; ++i) {
      const int r = g + 8 * i, n = 2 * t + i;
      A[i][k] = half(all[6 * ((r % 8) * 4 + (k % 8) / 2) + (r >= 8) + 2 * (k >= 8)], k % 2);
      B[k][i] = half(all[6 * (n * 4 + (k % 8) / 2) + 4 + (k >= 8)], k % 2);
    }
  }
  for (int e = 0; e < 4; ++e) {
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[e >> 1][k] * B[k][e & 1];
    d[e] += acc;
  }
}

EMU_INLINE void cp_async_16(void* dst, const void* src, bool valid) {
  emu::queue_copy(dst, src, 16, valid);
}
EMU_INLINE void cp_async_4(void* dst, const void* src, bool valid) {
  emu::queue_copy(dst, src, 4, valid);
}
inline void cp_async_commit() { emu::commit_copies(); }
inline void cp_async_wait_all() { emu::wait_copies(0, true); }
template <int N> inline void cp_async_wait_group() { emu::wait_copies(N, false); }

}  // namespace attn
}  // namespace fastbert
