// Kernels with one deliberate bug each (and their correct twins): tests/test_cuda_emulation.py
// shows that every check of the emulation fires, names the kernel and says where. Built only into
// the emulation (tests/cuda_emulation.py), through the same source rewriting as csrc/.
#include <cuda_runtime.h>

namespace selftest_kernels {

// y[i] = x[i + shift]: shift 1 reads one element past x's end.
__global__ void shifted_copy_kernel(const float* x, float* y, int n, int shift) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i + shift];
}

// y[i - 1] = x[i]: thread 0 writes one element before y's start.
__global__ void write_before_kernel(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i - 1] = x[i];
}

// Each thread reads its neighbour's shared element; `barrier` orders the write and the read.
__global__ void neighbour_kernel(const float* x, float* y, int n, bool barrier) {
  __shared__ float tile[64];
  const int t = threadIdx.x;
  tile[t] = x[t];
  if (barrier) __syncthreads();
  y[t] = tile[(t + 1) % n];
}

// The same through dynamic shared memory of `n` floats; with n < blockDim.x threads past n write
// past the launch's allocation.
__global__ void dynamic_smem_kernel(const float* x, float* y, int n) {
  extern __shared__ float dyn[];
  const int t = threadIdx.x;
  dyn[t] = x[t];
  __syncthreads();
  y[t] = dyn[t];
}

// The first warp skips the barrier (divergent __syncthreads), or all threads reach it.
__global__ void divergent_barrier_kernel(const float* x, float* y, int n, bool divergent) {
  const int t = threadIdx.x;
  if (!divergent || t >= 32) __syncthreads();
  y[t] = x[t];
}

// Lanes of one warp exchange through shared memory, ordered by __syncwarp or not.
__global__ void warp_exchange_kernel(const float* x, float* y, int n, bool sync) {
  __shared__ float lanes[32];
  const int t = threadIdx.x;
  lanes[t] = x[t];
  if (sync) __syncwarp();
  y[t] = lanes[31 - t];
}

// A 16-byte vector load from x + shift (shift 1: not 16-byte aligned).
__global__ void vector_load_kernel(const float* x, float* y, int n, int shift) {
  const float4 v = *reinterpret_cast<const float4*>(x + shift);
  y[threadIdx.x] = v.x + v.y + v.z + v.w;
}

}  // namespace selftest_kernels

// case: 0 clean copy, 1 read past the end, 2 write before the start, 3 shared race, 4 the same
// with a barrier, 5 shared past the dynamic allocation, 6 within it, 7 divergent barrier,
// 8 uniform barrier, 9 warp race, 10 __syncwarp, 11 64 KiB of dynamic shared memory without
// cudaFuncSetAttribute, 12 misaligned vector load, 13 aligned, 14 the host reads x (device
// memory) to size the grid. Returns cudaGetLastError() after the launch.
extern "C" int emu_selftest(int which, const float* x, float* y, int n) {
  using namespace selftest_kernels;
  switch (which) {
    case 0: shifted_copy_kernel<<<(n + 31) / 32, 32>>>(x, y, n, 0); break;
    case 1: shifted_copy_kernel<<<(n + 31) / 32, 32>>>(x, y, n, 1); break;
    case 2: write_before_kernel<<<(n + 31) / 32, 32>>>(x, y, n); break;
    case 3: neighbour_kernel<<<1, 64>>>(x, y, 64, false); break;
    case 4: neighbour_kernel<<<1, 64>>>(x, y, 64, true); break;
    case 5: dynamic_smem_kernel<<<1, 64, 32 * sizeof(float)>>>(x, y, n); break;
    case 6: dynamic_smem_kernel<<<1, 64, 64 * sizeof(float)>>>(x, y, n); break;
    case 7: divergent_barrier_kernel<<<1, 64>>>(x, y, n, true); break;
    case 8: divergent_barrier_kernel<<<1, 64>>>(x, y, n, false); break;
    case 9: warp_exchange_kernel<<<1, 32>>>(x, y, n, false); break;
    case 10: warp_exchange_kernel<<<1, 32>>>(x, y, n, true); break;
    case 11: dynamic_smem_kernel<<<1, 64, 64 * 1024>>>(x, y, n); break;
    case 12: vector_load_kernel<<<1, 1>>>(x, y, n, 1); break;
    case 13: vector_load_kernel<<<1, 1>>>(x, y, n, 4); break;
    case 14: shifted_copy_kernel<<<(n + 31) / 32 + (x[0] != x[0]), 32>>>(x, y, n, 0); break;
  }
  return (int)cudaGetLastError();
}
