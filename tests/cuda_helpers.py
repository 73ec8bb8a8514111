"""What tests/test_cuda*.py share: dtypes, the autouse fixtures every CUDA test module imports,
the built-extension requirement, the host emulation of the extension (built once per process),
Philox in plain Python and the dropout keep-rate check."""
from __future__ import annotations

import atexit
import contextlib
import functools
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from fastbert import cuda as cuda_backend
from tests.helpers import poison_

ROOT = Path(__file__).resolve().parent.parent

HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture(autouse=True)
def extension_runs_here(request):
    """gpu tests need the built extension to run on this GPU. Built but unusable here (e.g. a
    driver older than the statically linked CUDA runtime) FAILS with the reason: a green GPU run
    that tested nothing is worse than a red one. FASTBERT_ALLOW_CUDA_SKIP=1 skips instead."""
    if "gpu" in request.keywords and torch.cuda.is_available():
        reason = cuda_backend.unavailable_reason()
        if reason is not None:
            message = f"CUDA backend unusable on this GPU: {reason}"
            if cuda_backend._C is None or os.environ.get("FASTBERT_ALLOW_CUDA_SKIP") == "1":
                pytest.skip(message)
            pytest.fail(message + " (FASTBERT_ALLOW_CUDA_SKIP=1 turns this into a skip)")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the backend hands to a kernel starts as NaN, so unwritten elements show."""
    monkeypatch.setattr(cuda_backend, "_empty",
                        lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype,
                                                                         device=device)))


def require_built():
    info = cuda_backend.extension_info()
    if not info["built"]:
        if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
            pytest.skip("nvcc is not installed, so pip skipped the CUDA extension")
        pytest.fail(f"nvcc is installed but fastbert._C did not build or import: {info['error']}")
    return info


@functools.lru_cache(maxsize=None)
def emulation_library():
    """tests/cuda_emulation.py's build of the extension for the host, once per process (every
    module that uses it shares it); None without g++ (the instrumentation flags are GCC's) or
    the CUDA headers."""
    from tests import cuda_emulation

    compiler = shutil.which("g++")
    include = cuda_emulation.cuda_include_dir()
    if compiler is None or include is None:
        return None
    build_dir = Path(tempfile.mkdtemp(prefix="fastbert-emulation-"))
    atexit.register(shutil.rmtree, build_dir, ignore_errors=True)
    return cuda_emulation.build(build_dir, compiler, include)


@pytest.fixture(scope="module")
def emulated_backend():
    """fastbert.cuda with its extension replaced by the host emulation until the module ends: the
    real launchers and kernels run on CPU tensors through fastbert/cuda.py's entry points, and
    every call is checked by the emulation's memcheck, racecheck and synccheck."""
    from tests import cuda_emulation

    lib = emulation_library()
    if lib is None:
        pytest.skip("the CUDA emulation needs g++ and the CUDA headers")
    patch = pytest.MonkeyPatch()
    patch.setattr(cuda_backend, "_C", cuda_emulation.EmuC(lib))
    patch.setattr(cuda_backend, "_on_device", lambda device: contextlib.nullcontext())
    patch.setattr(cuda_backend, "_stream", lambda t: 0)
    yield cuda_backend
    patch.undo()


def philox4x32_10(counter, key):
    """Philox-4x32-10 in plain Python, written from the paper (Salmon et al., SC 2011)."""
    mask = 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        if round_ > 0:
            k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & mask, (p0 >> 32) ^ c3 ^ k1, p0 & mask
    return c0, c1, c2, c3


def assert_keep_rate(keep, p, what):
    """The fraction kept is 1 - p within 5 standard deviations of a binomial."""
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (what, rate, 1 - p, n)
