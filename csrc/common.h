// Host-side helpers: errors that name the op, the device check, dtype codes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace fastbert {

// dtype codes shared with fastbert/cuda.py
enum DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

inline void check_cuda(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls start clean
    throw std::runtime_error(std::string(op) + ": CUDA error in " + what + ": " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

inline void check_arg(bool ok, const char* op, const std::string& msg) {
  if (!ok) throw std::invalid_argument(std::string(op) + ": " + msg);
}

// Called first by every launcher, so that calling into the extension on a machine without a
// usable GPU raises a clear error instead of launching anything. The answer cannot change within
// a process, so the driver is asked once (not per launch).
inline void require_device(const char* op) {
  static const std::string why = [] {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return std::string("no usable CUDA device (") + cudaGetErrorString(err) + ")";
    }
    return count == 0 ? std::string("no CUDA device found") : std::string();
  }();
  if (!why.empty()) throw std::runtime_error(std::string(op) + ": " + why);
}

// Multiprocessor count of the current device, asked once per device.
inline int sm_count(const char* op) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> counts[kMaxDevices] = {};  // 0 = not asked yet
  int device = 0, count = 0;
  check_cuda(cudaGetDevice(&device), op, "cudaGetDevice");
  if (device < kMaxDevices && counts[device] > 0) return counts[device];
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), op,
             "cudaDeviceGetAttribute");
  if (device < kMaxDevices) counts[device] = count;
  return count;
}

inline void check_launch(const char* op, const char* kernel) {
  check_cuda(cudaGetLastError(), op, kernel);
}

// Calls f(T{}) with T the element type of a 16-bit float code (attention).
template <typename F> void dispatch_half(int code, const char* op, F&& f) {
  switch (code) {
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(std::string(op) + ": dtype code " +
                                         std::to_string(code) + " is not float16 or bfloat16");
  }
}

// Calls f(T{}) with T the element type of a float code (fp16, bf16, fp32).
template <typename F> void dispatch_float(int code, const char* op, F&& f) {
  if (code == kFloat32) {
    f(float{});
  } else {
    dispatch_half(code, op, f);
  }
}

// Whether every address is 16-byte aligned (the vectorised kernels' loads and stores need it).
inline bool aligned16(std::initializer_list<uintptr_t> ptrs) {
  for (uintptr_t p : ptrs)
    if (p % 16 != 0) return false;
  return true;
}

// How many row groups the dbias partial sums of an FFN epilogue's backward use: one per group of
// rows_per_block rows, at most two per SM (the column sum that follows reads them all) and at most
// gridDim.y's 65535.
inline int64_t epilogue_backward_parts(const char* op, int64_t rows, int rows_per_block) {
  const int64_t row_groups = (rows + rows_per_block - 1) / rows_per_block;
  return std::max<int64_t>(1, std::min<int64_t>({row_groups, 2 * (int64_t)sm_count(op), 65535}));
}

// Calls run(std::integral_constant<int, V>{}) with V = 16 / sizeof(T) elements per access when
// the row length n is a multiple of V and every address is 16-byte aligned, else V = 1: the
// vectorised and scalar variants of the elementwise kernels.
template <typename T, typename F>
void by_width(int64_t n, std::initializer_list<uintptr_t> ptrs, F&& run) {
  constexpr int kVec = 16 / sizeof(T);
  if (n % kVec == 0 && aligned16(ptrs)) {
    run(std::integral_constant<int, kVec>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T> T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace fastbert
