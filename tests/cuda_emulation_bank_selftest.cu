// Shared-memory access patterns whose bank conflicts are known: tests/test_cuda_emulation.py
// checks the emulation's bankcheck (tests/cuda_emulation.cpp) counts them as a GPU does. Built only
// into the emulation (tests/cuda_emulation.py), through the same source rewriting as csrc/.
#include <cuda_runtime.h>

namespace selftest_kernels {

// One warp; each active lane makes exactly one shared-memory access, of pattern `which` (see
// emu_bank_selftest), and writes what it read to y.
__global__ void bank_pattern_kernel(const float* x, float* y, int n, int which) {
  __shared__ __align__(16) float tile[32 * 68];
  const int l = threadIdx.x;
  float r = 0.f;
  float2 v2;
  float4 v4 = make_float4(0.f, 0.f, 0.f, 0.f);
  switch (which) {
    case 0: r = tile[l]; break;
    case 1: r = tile[2 * l]; break;
    case 2: r = tile[32 * l]; break;
    case 3: r = tile[0]; break;
    case 4: r = tile[l / 2]; break;
    case 5: v4 = *reinterpret_cast<const float4*>(tile + 4 * l); break;
    case 6: v4 = *reinterpret_cast<const float4*>(tile + 64 * l); break;
    case 7: v4 = *reinterpret_cast<const float4*>(tile + 68 * l); break;
    case 8: if (l < 8) v4 = *reinterpret_cast<const float4*>(tile + 64 * l); break;
    case 9: if (l < 8) v4 = *reinterpret_cast<const float4*>(tile + 68 * l); break;
    case 10: v4 = *reinterpret_cast<const float4*>(tile); break;
    case 11: v4 = *reinterpret_cast<const float4*>(tile + 64 * (l % 8) + 4 * (l / 8)); break;
    case 12: v2 = *reinterpret_cast<const float2*>(tile + 2 * l); r = v2.x + v2.y; break;
    case 13: tile[2 * l] = x[l]; break;
    case 14: r = reinterpret_cast<const unsigned short*>(tile)[l]; break;
    case 15:
      for (int i = 0; i < 4; ++i) r += tile[l << i];  // one site, four warp instructions
      break;
  }
  if (which >= 5 && which <= 11) r = v4.x + v4.y + v4.z + v4.w;
  y[l] = r;
}

}  // namespace selftest_kernels

// which (lane l of one warp of 32; tile a 16-byte aligned float array): 0 tile[l], 1 tile[2l],
// 2 tile[32l], 3 tile[0] (all lanes), 4 tile[l / 2], 5 float4 at tile + 4l, 6 float4 at
// tile + 64l (rows of 64 floats), 7 float4 at tile + 68l (rows of 68), 8 and 9 the same by lanes
// 0..7 only, 10 float4 at tile (all lanes), 11 float4 at row l % 8 (of 64 floats), column
// 4 (l / 8), 12 float2 at tile + 2l, 13 store tile[2l], 14 2-byte load of half-word l, 15 a loop
// reading tile[l], tile[2l], tile[4l], tile[8l]. Returns cudaGetLastError() after the launch.
extern "C" int emu_bank_selftest(int which, const float* x, float* y, int n) {
  selftest_kernels::bank_pattern_kernel<<<1, 32>>>(x, y, n, which);
  return (int)cudaGetLastError();
}
