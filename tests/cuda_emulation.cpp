// Host emulation of the CUDA attention kernels (kernels/attention_fwd.cuh, attention_bwd.cuh) for
// the compile test tier (tests/test_cuda_attention.py), so that the real kernel code runs without a GPU.
// Every thread of a block is a fiber (ucontext) on one OS thread, scheduled round-robin; barriers,
// shuffles, ballots, ldmatrix and mma.m16n8k16 are emulated per warp from the PTX ISA's
// definitions (the same model test_fragment_index_model checks the kernels' offsets against);
// cp.async is a synchronous copy, so this finds logic errors (indexing, masking, softmax,
// dropout, varlen addressing, epilogues), not races. Built as a shared library for ctypes
// (tests/cuda_emulation.py).
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

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
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define FASTBERT_HOST_EMULATION

namespace emu {
struct Copy {
  void* dst;
  const void* src;
  int bytes;
  bool valid;
};
struct Fiber {
  ucontext_t ctx;
  bool done = false;
  std::unique_ptr<char[]> stack;
  std::vector<Copy> pending;  // cp.async copies issued and not yet waited for
};
struct Warp {
  int count = 0, gen = 0;
  uint32_t slot[32][6];
};
struct Block {
  int count = 0, gen = 0, threads = 0;
};
ucontext_t scheduler;
Fiber* current = nullptr;
uint3 tid, bid;
dim3 bdim, gdim;
int cur_lane = 0;
Warp* cur_warp = nullptr;
Block* cur_block = nullptr;
std::vector<Warp>* warps = nullptr;
inline void yield() { swapcontext(&current->ctx, &scheduler); }
inline void warp_barrier() {
  Warp& w = *cur_warp;
  const int gen = w.gen;
  if (++w.count == 32) {
    w.count = 0;
    ++w.gen;
  } else {
    while (w.gen == gen) yield();
  }
}
inline void block_barrier() {
  Block& b = *cur_block;
  const int gen = b.gen;
  if (++b.count == b.threads) {
    b.count = 0;
    ++b.gen;
  } else {
    while (b.gen == gen) yield();
  }
}
}  // namespace emu

#define threadIdx emu::tid
#define blockIdx emu::bid
#define blockDim emu::bdim
#define gridDim emu::gdim
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp() { emu::warp_barrier(); }
inline uint32_t emu_exchange(uint32_t v, int from) {
  emu::cur_warp->slot[emu::cur_lane][0] = v;
  emu::warp_barrier();
  const uint32_t r = emu::cur_warp->slot[from][0];
  emu::warp_barrier();
  return r;
}
inline unsigned __shfl_xor_sync(unsigned, unsigned v, int m) {
  return emu_exchange(v, emu::cur_lane ^ m);
}
inline float __shfl_xor_sync(unsigned, float v, int m) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = emu_exchange(bits, emu::cur_lane ^ m);
  float r;
  std::memcpy(&r, &bits, 4);
  return r;
}
inline unsigned __ballot_sync(unsigned, int p) {
  emu::cur_warp->slot[emu::cur_lane][0] = p != 0;
  emu::warp_barrier();
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= emu::cur_warp->slot[l][0] << l;
  emu::warp_barrier();
  return r;
}
inline int __all_sync(unsigned m, int p) { return __ballot_sync(m, p) == 0xffffffffu; }
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

namespace fastbert {
namespace attn {
alignas(128) unsigned char smem[256 * 1024];

inline uint32_t smem_addr(const void* p) {
  return (uint32_t)((const unsigned char*)p - smem);
}
inline uint16_t smem16(uint32_t addr, int i) {
  uint16_t v;
  std::memcpy(&v, smem + addr + 2 * i, 2);
  return v;
}
inline void ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
  emu::Warp& w = *emu::cur_warp;
  const int lane = emu::cur_lane, g = lane / 4, t = lane % 4;
  w.slot[lane][0] = addr;
  emu::warp_barrier();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (trans) {
      lo = smem16(w.slot[8 * i + 2 * t][0], g);
      hi = smem16(w.slot[8 * i + 2 * t + 1][0], g);
    } else {
      lo = smem16(w.slot[8 * i + g][0], 2 * t);
      hi = smem16(w.slot[8 * i + g][0], 2 * t + 1);
    }
    r[i] = lo | (uint32_t)hi << 16;
  }
  emu::warp_barrier();
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix(r, addr, true); }

template <typename T> float bits_to_float(uint16_t b);
template <> float bits_to_float<__half>(uint16_t b) {
  __half_raw raw;
  raw.x = b;
  return __half2float(__half(raw));
}
template <> float bits_to_float<__nv_bfloat16>(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T> uint16_t float_to_bits(float x);
template <> uint16_t float_to_bits<__half>(float x) {
  __half h = __float2half_rn(x);
  return __half_raw(h).x;
}
template <> uint16_t float_to_bits<__nv_bfloat16>(float x) {
  __nv_bfloat16 h = __float2bfloat16_rn(x);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
template <typename T> inline uint32_t pack2(float lo, float hi) {
  return float_to_bits<T>(lo) | (uint32_t)float_to_bits<T>(hi) << 16;
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Warp& w = *emu::cur_warp;
  const int lane = emu::cur_lane;
  for (int i = 0; i < 4; ++i) w.slot[lane][i] = a[i];
  w.slot[lane][4] = b0;
  w.slot[lane][5] = b1;
  emu::warp_barrier();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    auto lo = [&](uint32_t x) { return bits_to_float<T>(x & 0xffff); };
    auto hi = [&](uint32_t x) { return bits_to_float<T>(x >> 16); };
    const uint32_t* s = w.slot[l];
    A[g][2 * t] = lo(s[0]), A[g][2 * t + 1] = hi(s[0]);
    A[g + 8][2 * t] = lo(s[1]), A[g + 8][2 * t + 1] = hi(s[1]);
    A[g][2 * t + 8] = lo(s[2]), A[g][2 * t + 9] = hi(s[2]);
    A[g + 8][2 * t + 8] = lo(s[3]), A[g + 8][2 * t + 9] = hi(s[3]);
    B[2 * t][g] = lo(s[4]), B[2 * t + 1][g] = hi(s[4]);
    B[2 * t + 8][g] = lo(s[5]), B[2 * t + 9][g] = hi(s[5]);
  }
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    d[e] += acc;
  }
  emu::warp_barrier();
}

// cp.async lands only at the issuing thread's wait, so a read before wait + barrier sees stale data.
inline void cp_async_16(void* dst, const void* src, bool valid) {
  emu::current->pending.push_back({dst, src, 16, valid});
}
inline void cp_async_4(void* dst, const void* src, bool valid) {
  emu::current->pending.push_back({dst, src, 4, valid});
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {
  for (const emu::Copy& c : emu::current->pending) {
    if (c.valid) std::memcpy(c.dst, c.src, c.bytes); else std::memset(c.dst, 0, c.bytes);
  }
  emu::current->pending.clear();
}
}  // namespace attn
}  // namespace fastbert

#include "kernels/attention_bwd.cuh"
#include "kernels/attention_fwd.cuh"

namespace emu {
std::function<void()> body;
void fiber_main() {
  body();
  current->done = true;
}

template <typename P>
void launch(void (*kernel)(P), dim3 grid, int threads, const P& p) {
  constexpr size_t kStack = 256 * 1024;
  body = [&] { kernel(p); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block block;
        block.threads = threads;
        std::memset(fastbert::attn::smem, 0xff, sizeof(fastbert::attn::smem));  // NaN if unwritten
        std::vector<Warp> warp_state(threads / 32);
        std::vector<Fiber> fibers(threads);
        for (auto& f : fibers) {
          f.stack.reset(new char[kStack]);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.get();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = &scheduler;
          makecontext(&f.ctx, fiber_main, 0);
        }
        // The order fibers run in changes every round (a missing barrier then shows as a wrong
        // result more often than with one fixed order).
        unsigned round = 0;
        for (bool running = true; running; ++round) {
          running = false;
          for (int i = 0; i < threads; ++i) {
            const int t = round % 2 ? threads - 1 - i : (i * 37 + round) % threads;
            if (fibers[t].done) continue;
            running = true;
            current = &fibers[t];
            tid = uint3{(unsigned)t, 0, 0};
            bid = uint3{x, y, z};
            bdim = dim3(threads);
            gdim = grid;
            cur_lane = t % 32;
            cur_warp = &warp_state[t / 32];
            cur_block = &block;
            swapcontext(&scheduler, &fibers[t].ctx);
          }
        }
      }
}
}  // namespace emu

using namespace fastbert;
using namespace fastbert::attn;

static unsigned cdiv(long a, long b) { return (unsigned)((a + b - 1) / b); }
static Strides st(const int64_t* s) { return Strides{s[0], s[1], s[2]}; }

template <typename T, int D, bool kDrop> void forward(Params<T> p) {
  using Tr = FwdTraits<D, kDrop>;
  emu::launch(fwd_kernel<T, D, kDrop>, dim3(cdiv(p.Sq, Tr::kBlockM), p.H, p.B), Tr::kThreads, p);
}

template <typename T, int D, bool kDrop> void backward(Params<T> p, long total_q) {
  constexpr int kRows = kDeltaThreads / (D / 8);
  if (p.Sq > 0)
    emu::launch(delta_kernel<T, D>, dim3(cdiv(p.Sq, kRows), p.H, p.B), kDeltaThreads, p);
  if (p.Sk > 0)
    emu::launch(dkdv_kernel<T, D, kDrop>, dim3(cdiv(p.Sk, BwdTraits<D>::kBlockN), p.H, p.B),
                BwdTraits<D>::kThreads, p);
  if (p.dq_accum == nullptr && p.Sq > 0)
    emu::launch(dq_kernel<T, D, kDrop>, dim3(cdiv(p.Sq, DqTraits<D>::kBlockM), p.H, p.B),
                DqTraits<D>::kThreads, p);
  if (p.dq_accum != nullptr) {  // dq_convert_kernel's arithmetic
    const long n = total_q * p.H * D;
    for (long i = 0; i < n; ++i)
      reinterpret_cast<uint16_t*>(p.dq)[i] = float_to_bits<T>(p.dq_accum[i] * p.scale);
  }
}

template <typename F> void dispatch(int dtype, int D, bool drop, F&& f) {
  auto with_t = [&](auto t) {
    using T = decltype(t);
    auto with_d = [&](auto d) {
      constexpr int kD = decltype(d)::value;
      if (drop) f(T{}, std::integral_constant<int, kD>{}, std::true_type{});
      else f(T{}, std::integral_constant<int, kD>{}, std::false_type{});
    };
    if (D == 32) with_d(std::integral_constant<int, 32>{});
    else if (D == 64) with_d(std::integral_constant<int, 64>{});
    else with_d(std::integral_constant<int, 128>{});
  };
  if (dtype == 0) with_t(__half{}); else with_t(__nv_bfloat16{});
}

template <typename T>
Params<T> params(const void* q, const void* k, const void* v, const void* mask, const int* cu_q,
                 const int* cu_k, void* out, float* lse, int B, int H, int Sq, int Sk,
                 int64_t lse_b, int64_t lse_h, const int64_t* q_st, const int64_t* k_st,
                 const int64_t* v_st, const int64_t* out_st, int causal, float scale, double p,
                 uint64_t seed) {
  Params<T> x{};
  x.q = (const T*)q, x.k = (const T*)k, x.v = (const T*)v, x.mask = (const uint8_t*)mask;
  x.cu_q = cu_q, x.cu_k = cu_k, x.out = (T*)out, x.lse = lse;
  x.q_st = st(q_st), x.k_st = st(k_st), x.v_st = st(v_st), x.out_st = st(out_st);
  x.lse_b = lse_b, x.lse_h = lse_h;
  x.B = B, x.H = H, x.Sq = Sq, x.Sk = Sk, x.scale = scale, x.causal = causal != 0;
  x.dropout = make_dropout(p, seed);
  return x;
}

extern "C" void emu_forward(int dtype, int D, const void* q, const void* k, const void* v,
                            const void* mask, const int* cu_q, const int* cu_k, void* out,
                            float* lse, int B, int H, int Sq, int Sk, int64_t lse_b,
                            int64_t lse_h, const int64_t* q_st, const int64_t* k_st,
                            const int64_t* v_st, const int64_t* out_st, int causal, float scale,
                            double p, uint64_t seed) {
  dispatch(dtype, D, p > 0, [&](auto t, auto d, auto drop) {
    using T = decltype(t);
    forward<T, decltype(d)::value, decltype(drop)::value>(
        params<T>(q, k, v, mask, cu_q, cu_k, out, lse, B, H, Sq, Sk, lse_b, lse_h, q_st, k_st,
                  v_st, out_st, causal, scale, p, seed));
  });
}

extern "C" void emu_backward(int dtype, int D, const void* dout, const void* q, const void* k,
                             const void* v, const void* out, float* lse, const void* mask,
                             const int* cu_q, const int* cu_k, void* dq, void* dk, void* dv,
                             float* delta, float* dq_accum, int B, int H, int Sq, int Sk,
                             long total_q, int64_t lse_b, int64_t lse_h, const int64_t* dout_st,
                             const int64_t* q_st, const int64_t* k_st, const int64_t* v_st,
                             const int64_t* out_st, const int64_t* dq_st, const int64_t* dk_st,
                             const int64_t* dv_st, int causal, float scale, double p,
                             uint64_t seed) {
  dispatch(dtype, D, p > 0, [&](auto t, auto d, auto drop) {
    using T = decltype(t);
    Params<T> x = params<T>(q, k, v, mask, cu_q, cu_k, (void*)out, lse, B, H, Sq, Sk, lse_b,
                            lse_h, q_st, k_st, v_st, out_st, causal, scale, p, seed);
    x.dout = (const T*)dout, x.dq = (T*)dq, x.dk = (T*)dk, x.dv = (T*)dv;
    x.delta = delta, x.dq_accum = dq_accum;
    x.dout_st = st(dout_st), x.dq_st = st(dq_st), x.dk_st = st(dk_st), x.dv_st = st(dv_st);
    x.acc_st = x.dq_st;
    backward<T, decltype(d)::value, decltype(drop)::value>(x, total_q);
  });
}
