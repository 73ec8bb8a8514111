// pybind11 module fastbert._C: the kernel launchers plus build information.
// Exceptions thrown by the launchers become Python exceptions: std::invalid_argument ->
// ValueError, std::runtime_error (CUDA errors, no device) -> RuntimeError.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "csrc/launchers.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastbert CUDA kernels (no torch: pointers, shapes, strides and a stream)";
  m.attr("archs") = FASTBERT_CUDA_ARCHS;
  m.attr("cuda_version") = CUDART_VERSION;
  m.attr("dtype_codes") = py::dict(py::arg("float16") = 0, py::arg("bfloat16") = 1,
                                   py::arg("float32") = 2);

  m.def("set_device", &fastbert::set_device);
  m.def("probe_device", &fastbert::probe_device);
  m.def("attention_smem_bytes", &fastbert::attention_smem_bytes);
  m.def("attention_tile_info", &fastbert::attention_tile_info);
  m.def("max_smem_per_block", &fastbert::max_smem_per_block);
  m.def("attention_forward", &fastbert::attention_forward);
  m.def("attention_backward", &fastbert::attention_backward);
  m.def("attention_varlen_forward", &fastbert::attention_varlen_forward);
  m.def("attention_varlen_backward", &fastbert::attention_varlen_backward);
  m.def("add_layer_norm_forward", &fastbert::add_layer_norm_forward);
  m.def("add_layer_norm_backward_parts", &fastbert::add_layer_norm_backward_parts);
  m.def("add_layer_norm_backward", &fastbert::add_layer_norm_backward);
  m.def("bias_gelu_forward", &fastbert::bias_gelu_forward);
  m.def("gelu_backward_parts", &fastbert::gelu_backward_parts);
  m.def("gelu_backward", &fastbert::gelu_backward);
  m.def("apply_rotary", &fastbert::apply_rotary);
  m.def("geglu_forward", &fastbert::geglu_forward);
  m.def("geglu_backward_parts", &fastbert::geglu_backward_parts);
  m.def("geglu_backward", &fastbert::geglu_backward);
}
