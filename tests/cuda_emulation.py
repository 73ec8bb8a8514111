"""fastbert._C's attention entry points run by the host emulation of tests/cuda_emulation.cpp.

`build(tmp_dir)` compiles it (g++ with the CUDA headers); `EmuC(path)` has the extension's call
signatures, so fastbert/cuda.py runs unchanged on CPU tensors with `_C` replaced by it. The early
returns mirror the launchers in csrc/attention.cu; dq_convert_kernel's arithmetic is done in C++.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
P, I, L, F, Dd, U = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float,
                     ctypes.c_double, ctypes.c_uint64)


def cuda_include_dir():
    """The CUDA headers (cuda_fp16.h, ...) next to nvcc, or under CUDA_HOME; None if absent."""
    homes = [os.environ.get("CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    homes += ["/usr/local/cuda"] + sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))
    for home in homes:
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return Path(home) / "include"
    return None


def build(tmp_dir: Path, compiler: str, include: Path) -> Path:
    lib = tmp_dir / "cuda_emulation.so"
    subprocess.run([compiler, "-std=c++20", "-O1", "-fPIC", "-shared", "-w", f"-I{ROOT}",
                    f"-I{include}", str(ROOT / "tests" / "cuda_emulation.cpp"), "-o", str(lib)],
                   check=True)
    return lib


class EmuC:
    """The attention entry points of fastbert._C (same signatures), run by the host emulation."""
    archs = "emu"
    cuda_version = 13000

    def __init__(self, path):
        self.lib = lib = ctypes.CDLL(str(path))
        lib.emu_forward.argtypes = [I, I] + [P] * 8 + [I] * 4 + [L, L] + [P] * 4 + [I, F, Dd, U]
        lib.emu_backward.argtypes = ([I, I] + [P] * 14 + [I] * 4 + [L, L, L] + [P] * 8 +
                                     [I, F, Dd, U])

    @staticmethod
    def _st(s):
        return ctypes.cast((ctypes.c_int64 * 3)(*s), P)

    def set_device(self, device):
        pass

    def attention_forward(self, q, k, v, mask, out, lse, B, Sq, Sk, H, D, q_st, k_st, v_st, out_st,
                          causal, scale, p, seed, dtype, stream):
        if Sq == 0:
            return
        self.lib.emu_forward(dtype, D, q, k, v, mask or None, None, None, out, lse, B, H, Sq, Sk,
                             H * Sq, Sq, *map(self._st, (q_st, k_st, v_st, out_st)), causal, scale,
                             p, seed)

    def attention_backward(self, dout, q, k, v, out, lse, mask, dq, dk, dv, delta, acc, B, Sq, Sk,
                           H, D, *rest):
        strides, (causal, scale, p, seed, dtype, stream) = rest[:8], rest[8:]
        if Sq == 0 and Sk == 0:
            return
        self.lib.emu_backward(dtype, D, dout, q, k, v, out, lse, mask or None, None, None, dq, dk,
                              dv, delta, acc or None, B, H, Sq, Sk, B * Sq, H * Sq, Sq,
                              *map(self._st, strides), causal, scale, p, seed)

    def attention_varlen_forward(self, q, k, v, cu_q, cu_k, out, lse, B, total_q, max_q, max_k, H,
                                 D, q_st, k_st, v_st, out_st, causal, scale, p, seed, dtype,
                                 stream):
        if total_q == 0 or max_q == 0:
            return
        self.lib.emu_forward(dtype, D, q, k, v, None, cu_q, cu_k, out, lse, B, H, max_q, max_k, 0,
                             total_q, *map(self._st, (q_st, k_st, v_st, out_st)), causal, scale,
                             p, seed)

    def attention_varlen_backward(self, dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, delta, acc,
                                  B, total_q, max_q, max_k, H, D, *rest):
        strides, (causal, scale, p, seed, dtype, stream) = rest[:8], rest[8:]
        if max_q == 0 and max_k == 0:
            return
        self.lib.emu_backward(dtype, D, dout, q, k, v, out, lse, None, cu_q, cu_k, dq, dk, dv,
                              delta, acc or None, B, H, max_q, max_k, total_q, 0, total_q,
                              *map(self._st, strides), causal, scale, p, seed)
