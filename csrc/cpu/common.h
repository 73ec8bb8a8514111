// What the translation units of fastbert._cpu share.
#pragma once

#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>
#include <string>

namespace fastbert_cpu {

// The instruction set every kernel of a call runs with: 2 AVX-512, 1 AVX2 + FMA, 0 neither
// (attention.cpp; tests force AVX2 through set_isa).
extern std::atomic<int> chosen_isa;

// The tensor at `address` (the Python side passes data_ptr()s).
template <typename T>
T* at(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// The ISA code for a call of `op`, or a clear error on a CPU with neither ISA.
int isa_for(const std::string& op);

// The 32-bit hash threshold below which dropout drops an element (0: keeps every one).
uint32_t drop_threshold(double dropout_p);

// 1 / the exact keep rate (2^32 - threshold) / 2^32, not 1 / (1 - dropout_p).
float drop_scale(uint32_t threshold);

// The layer-norm entries (layer_norm.cpp) on the module attention.cpp defines.
void register_layer_norm(pybind11::module_& m);

}  // namespace fastbert_cpu
