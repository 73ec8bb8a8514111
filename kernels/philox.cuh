// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
// counter-based RNG. philox4x32(counter, key) is a pure function, so any thread can regenerate
// any random number from its coordinates; the dropout kernels use this to draw the same keep mask
// in backward as in forward without storing it. Header-only, no CUDA headers needed, so a host
// compiler can build it too (tests/test_cuda.py checks it against the published test vectors).
//
// Dropout keep decision: an element is kept when its 32-bit random word is >= `threshold`, with
// threshold = round(p * 2^32) computed on the host (dropout_threshold), so P(keep) = 1 - p to
// within 2^-32. Kept values are scaled by 1 / (1 - p).
#pragma once
#include <stdint.h>

#ifdef __CUDACC__
#define FASTBERT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTBERT_HOST_DEVICE inline
#endif

namespace fastbert {

struct Philox4 {
  uint32_t x[4];
};

FASTBERT_HOST_DEVICE Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                        uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    // one 32x32 -> 64-bit product each (mul.wide.u32 on the GPU)
    const uint64_t p0 = (uint64_t)kMul0 * c0, p1 = (uint64_t)kMul1 * c2;
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The keep threshold for dropout probability p in [0, 1): round(p * 2^32), clamped.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0 + 0.5;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : (uint32_t)t;
}

// Dropout parameters a kernel carries: the 64-bit seed as the Philox key, the keep threshold
// and the scale 1 / (1 - p) for kept values.
struct DropoutParams {
  uint32_t key0, key1;
  uint32_t threshold;
  float keep_scale;
};

inline DropoutParams make_dropout(double p, uint64_t seed) {
  return DropoutParams{(uint32_t)seed, (uint32_t)(seed >> 32), dropout_threshold(p),
                       (float)(1.0 / (1.0 - p))};
}

}  // namespace fastbert
