"""The CUDA kernels of ModernBERT's ops (kernels/rotary.cuh, kernels/geglu.cuh through
fastbert/cuda.py's apply_rotary and linear_geglu_*) vs fastbert.reference.

- always: `unsupported` says why.
- compile: both kernels compile with nvcc for sm_80 and sm_90a with no stack and no spills, the
  vectorised variants use 16-byte loads and stores, and the built extension refuses cleanly
  without a GPU. The kernels themselves run on CPU under the host emulation in
  tests/test_cuda_emulation.py, through the check functions below.
  `python -m pytest -m compile -q tests/test_cuda_modernbert.py`
- gpu: the same checks on larger shapes and every dtype, the public ops with backend="cuda" and
  what `auto` picks, dbias determinism, compute-sanitizer.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fastbert
from fastbert import cuda as cuda_backend
from fastbert import ops, reference, rotary
from tests.cuda_helpers import ALL_DTYPES, HALF_DTYPES, ROOT, require_built
# autouse fixtures: imported, so they apply to every test in this module
from tests.cuda_helpers import extension_runs_here, poisoned_outputs  # noqa: F401
from tests.helpers import assert_close_by_rule
from tests.test_cuda_attention_static import _cuobjdump


# --------------------------------------------------------------------------------------------
# always: what the backend says it can serve
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op, kw, words", [
    ("fastbert.apply_rotary", dict(dtype=torch.float64, head_dim=64), "float16"),
    ("fastbert.linear_geglu", dict(dtype=torch.float64, in_features=8, out_features=8),
     "float16"),
    ("fastbert.linear_geglu", dict(dtype=torch.float16, in_features=8, out_features=0), ">= 2"),
])
def test_unsupported_says_why(op, kw, words):
    reason = cuda_backend.unsupported(op, **kw)
    assert reason is not None and words in reason


@pytest.mark.parametrize("op, kw", [
    ("fastbert.apply_rotary", dict(dtype=torch.bfloat16, head_dim=64)),
    ("fastbert.apply_rotary", dict(dtype=torch.float32, head_dim=17)),
    ("fastbert.linear_geglu", dict(dtype=torch.float16, in_features=768, out_features=2304)),
])
def test_supported_inputs(op, kw):
    assert cuda_backend.unsupported(op, **kw) is None


# --------------------------------------------------------------------------------------------
# the checks (gpu tier here, compile tier under the emulation in test_cuda_emulation.py)
# --------------------------------------------------------------------------------------------

def check_rotary(backend, device, lengths, heads, head_dim, half, dtype, interleaved, *,
                 packed=True, offsets=0, table_dtype=torch.float32, strided=True):
    """backend.apply_rotary forward, and backward (conjugate) against the gradient autograd
    takes through the fp64 reference, by the tolerance rule. packed: x (total, H, D) with
    positions restarting per sequence (rotary._positions, the op's own rule, checked against
    positions built here); else x (B, S, H, D), S = max(lengths). strided: x is the k slice of a
    packed (.., 3, H, D) projection. offsets: seqlen_offsets, an int or a per-sequence list."""
    b, longest = len(lengths), max(lengths)
    per_seq = list(offsets) if isinstance(offsets, (list, tuple)) else [offsets] * b
    table_rows = longest + max(per_seq) + 3
    angles = torch.rand(table_rows, half, dtype=torch.float64) * 2 * math.pi
    cos, sin = angles.cos().to(table_dtype).to(device), angles.sin().to(table_dtype).to(device)
    lead = (sum(lengths),) if packed else (b, longest)
    if strided:
        x = torch.randn(*lead, 3, heads, head_dim, dtype=dtype, device=device).select(-3, 1)
    else:
        x = torch.randn(*lead, heads, head_dim, dtype=dtype, device=device)
    offset_arg = (torch.tensor(per_seq, device=device) if isinstance(offsets, (list, tuple))
                  else offsets)
    want_positions = [p + per_seq[i] for i, n in enumerate(lengths)
                      for p in range(n if packed else longest)]
    want_positions = torch.tensor(want_positions, device=device).view(lead)
    if packed:
        cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
        positions = rotary._positions(x, cu, offset_arg)
    else:
        positions = rotary._positions(x, None, offset_arg).expand(lead)
    assert torch.equal(positions.expand(lead), want_positions)

    out = backend.apply_rotary(x, cos, sin, positions, interleaved, False)
    dout = torch.randn_like(out)
    dx = backend.apply_rotary(dout, cos, sin, positions, interleaved, True)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()

    x64 = x.double().requires_grad_()
    exact = reference.rotary_forward(x64, cos.double(), sin.double(), positions, interleaved)
    (exact_dx,) = torch.autograd.grad(exact, x64, dout.double())
    plain_cos, plain_sin = cos.to(dtype), sin.to(dtype)
    plain = reference.rotary_forward(x, plain_cos, plain_sin, positions, interleaved,
                                     upcast=False)
    plain_dx = reference.rotary_forward(dout, plain_cos, plain_sin, positions, interleaved,
                                        conjugate=True, upcast=False)
    tag = (f"lengths {lengths} H{heads} D{head_dim} R{2 * half} {dtype} table {table_dtype} "
           f"interleaved={interleaved} packed={packed} offsets={offsets} strided={strided}")
    assert_close_by_rule(out, plain, exact.detach(), f"rotary out [{tag}]")
    assert_close_by_rule(dx, plain_dx, exact_dx, f"rotary dx [{tag}]")
    assert torch.equal(out[..., 2 * half:], x[..., 2 * half:])  # pass-through dims: copied
    assert torch.equal(dx[..., 2 * half:], dout[..., 2 * half:])


def check_geglu(backend, device, m, k, n, dtype, approximate, with_bias):
    """backend.linear_geglu_forward / _backward: out, the kept pre-activation, dx, dweight and
    dbias against the fp64 reference by the tolerance rule."""
    x = torch.randn(m, k, dtype=dtype, device=device)
    weight = (torch.randn(2 * n, k, device=device) / math.sqrt(k)).to(dtype)
    bias = torch.randn(2 * n, dtype=dtype, device=device) if with_bias else None
    dout = torch.randn(m, n, dtype=dtype, device=device)

    out, pre = backend.linear_geglu_forward(x, weight, bias, approximate)
    dx, dw, db = backend.linear_geglu_backward(dout, x, weight, pre, approximate)
    assert out.shape == (m, n) and pre.shape == (m, 2 * n) and db.shape == (2 * n,)
    assert out.dtype == pre.dtype == dx.dtype == dw.dtype == db.dtype == dtype

    x64, w64, do64 = x.double(), weight.double(), dout.double()
    b64 = bias.double() if with_bias else None
    eout, epre = reference.linear_geglu_forward(x64, w64, b64, approximate)
    egrads = reference.linear_geglu_backward(do64, x64, w64, epre, approximate)
    pout, ppre = reference.linear_geglu_forward(x, weight, bias, approximate, upcast=False)
    pgrads = reference.linear_geglu_backward(dout, x, weight, ppre, approximate)
    tag = f"m{m} k{k} n{n} {dtype} {approximate} bias={with_bias}"
    assert_close_by_rule(out, pout, eout, f"geglu out [{tag}]")
    assert_close_by_rule(pre, ppre, epre, f"geglu pre [{tag}]")
    for name, got, p, e in zip(("dx", "dweight", "dbias"), (dx, dw, db), pgrads, egrads):
        assert_close_by_rule(got, p, e, f"geglu {name} [{tag}]")


# --------------------------------------------------------------------------------------------
# compile: registers, spills, stack and vector accesses of the compiled kernels (nvcc, no GPU)
# --------------------------------------------------------------------------------------------

def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


# kernel -> instantiations: rotary (T, table) in {fp16, bf16} x {T, fp32} + fp32 x fp32, each
# interleaved or not, vectorised or not; the GeGLU epilogues per dtype, vectorised or not
KERNELS = {"rotary_kernel": 5 * 2 * 2, "geglu_fwd_kernel": 3 * 2, "geglu_bwd_kernel": 3 * 2}


@pytest.fixture(scope="module")
def compiled_kernels(tmp_path_factory):
    """{(arch, demangled kernel): {"regs", "stack", "spill_stores", "spill_loads", "sass"}} from
    `nvcc -cubin -Xptxas -v` on csrc/rotary.cu and csrc/geglu.cu (their launchers instantiate
    every variant) and cuobjdump -sass."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (ships with nvcc and with triton)")
    tmp = tmp_path_factory.mktemp("modernbert_cubins")
    kernels = {}
    for arch in ("sm_80", "sm_90a"):
        for source in ("csrc/rotary.cu", "csrc/geglu.cu"):
            cubin = tmp / f"{arch}-{os.path.basename(source)}.cubin"
            run = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-std=c++17",
                                  "--expt-relaxed-constexpr", "-Xptxas", "-v", f"-I{ROOT}",
                                  str(ROOT / source), "-o", str(cubin)],
                                 capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stderr[-4000:]
            current = None
            for line in run.stderr.splitlines():
                m = re.search(r"Compiling entry function '(\w+)'", line)
                if m:
                    current = m[1]
                    kernels[(arch, current)] = {}
                m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
                              r"spill loads", line)
                if m and current:
                    kernels[(arch, current)].update(stack=int(m[1]), spill_stores=int(m[2]),
                                                    spill_loads=int(m[3]))
                m = re.search(r"Used (\d+) registers", line)
                if m and current:
                    kernels[(arch, current)]["regs"] = int(m[1])
            sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True,
                                  text=True, check=True).stdout
            for name, body in re.findall(r"Function : (\w+)\n(.*?)(?=Function : |\Z)", sass,
                                         re.S):
                kernels[(arch, name)]["sass"] = body
    mangled = sorted({name for _, name in kernels})
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True,
                               text=True, check=True).stdout.splitlines()
    names = dict(zip(mangled, demangled))
    return {(arch, names[name]): usage for (arch, name), usage in kernels.items()}


@pytest.mark.compile
def test_kernels_compile_without_spills_or_stack(compiled_kernels, static_table):
    """Every variant the launchers instantiate, sm_80 and sm_90a: no stack frame, no spills,
    <= 64 registers (256-thread blocks keep every warp slot of an SM filled: these kernels are
    memory-bound)."""
    rows = []
    for kernel, count in KERNELS.items():
        for arch in ("sm_80", "sm_90a"):
            found = {name: u for (a, name), u in compiled_kernels.items()
                     if a == arch and f"fastbert::{kernel}<" in name}
            assert len(found) == count, (arch, kernel, sorted(found))
            for name, usage in sorted(found.items()):
                assert usage["stack"] == usage["spill_stores"] == usage["spill_loads"] == 0, \
                    (arch, name, usage)
                assert usage["regs"] <= 64, (arch, name, usage["regs"])
                signature = re.search(r"<(.*?)>\(", name)[1]
                rows.append(f"{arch:7s} {kernel:17s} <{signature}>  REG {usage['regs']:3d}  "
                            f"stack {usage['stack']}  spills {usage['spill_stores']}")
    static_table("CUDA rotary / GeGLU kernels (nvcc -Xptxas -v)", "\n".join(rows))


@pytest.mark.compile
def test_vectorised_variants_use_16_byte_accesses(compiled_kernels):
    """The vectorised rotary variants (P > 1 pairs per item) and GeGLU epilogues (VEC > 1) load
    and store x / pre / out as 128-bit accesses; the scalar fallbacks have none."""
    for (arch, name), usage in compiled_kernels.items():
        m = re.search(r"fastbert::(rotary_kernel|geglu_fwd_kernel|geglu_bwd_kernel)<(.*?)>\(",
                      name)
        if m is None:
            continue
        width = int(m[2].split(",")[2 if m[1] == "rotary_kernel" else 1])
        loads = len(re.findall(r"LDG\.E\.128", usage["sass"]))
        stores = len(re.findall(r"STG\.E\.128", usage["sass"]))
        if width > 1:
            assert loads >= 1 and stores >= 1, (arch, name, loads, stores)
        elif m[1] != "rotary_kernel":  # the rotary table may still be read 16 bytes at a time
            assert loads == stores == 0, (arch, name, loads, stores)


@pytest.mark.compile
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_entry_points_without_gpu_raise_clean_errors():
    require_built()
    import fastbert._C as ext

    calls = {
        "fastbert.apply_rotary": [
            lambda: ext.apply_rotary(0, 0, 0, 0, 0, 4, 2, 64, 32, 16, 128, 64, False, False, 0, 2,
                                     0)],
        "fastbert.linear_geglu": [
            lambda: ext.geglu_forward(0, 0, 0, 4, 8, False, 0, 0),
            lambda: ext.geglu_backward_parts(4, 8),
            lambda: ext.geglu_backward(0, 0, 0, 0, 0, 4, 8, 1, False, 0, 0)],
    }
    for op, fns in calls.items():
        for fn in fns:
            with pytest.raises(RuntimeError, match=op + ": no (usable )?CUDA device"):
                fn()


# --------------------------------------------------------------------------------------------
# gpu
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("lengths, heads, head_dim, half, packed, offsets", [
    ([128, 1, 0, 517], 12, 64, 32, True, 0),        # ModernBERT-base heads, packed
    ([300, 77], 16, 64, 32, True, [5, 40]),         # per-sequence offsets
    ([33, 200], 4, 128, 24, False, 3),              # rotary dim < head dim, padded
    ([1000], 3, 40, 10, True, 0),                   # no 16-byte path: the scalar kernel
])
def test_rotary_matches_reference(lengths, heads, head_dim, half, packed, offsets, dtype,
                                  interleaved):
    for table_dtype in {torch.float32, dtype}:
        check_rotary(cuda_backend, "cuda", lengths, heads, head_dim, half, dtype, interleaved,
                     packed=packed, offsets=offsets, table_dtype=table_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m, k, n", [(1, 64, 96), (37, 48, 130), (512, 768, 1152),
                                     (1000, 256, 333)])
def test_linear_geglu_matches_reference(m, k, n, dtype, approximate, with_bias):
    check_geglu(cuda_backend, "cuda", m, k, n, dtype, approximate, with_bias)


@pytest.mark.gpu
def test_geglu_backward_is_deterministic():
    x = torch.randn(2048, 256, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(2048, 256, dtype=torch.bfloat16, device="cuda") / 16
    dout = torch.randn(2048, 1024, dtype=torch.bfloat16, device="cuda")
    _, pre = cuda_backend.linear_geglu_forward(x, weight, None, "none")
    first = cuda_backend.linear_geglu_backward(dout, x, weight, pre, "none")
    again = cuda_backend.linear_geglu_backward(dout, x, weight, pre, "none")
    assert torch.equal(first[2], again[2])  # dbias: the part the extension reduces


def check_public_ops(device):
    """fastbert.apply_rotary (packed, interleaved, per-sequence offsets) and fastbert.linear_geglu
    with backend="cuda" match the torch backend in fp32 (1e-5), outputs and every gradient,
    through autograd."""
    cos, sin = (f(torch.rand(40, 8, device=device) * 6.3) for f in (torch.cos, torch.sin))
    cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32, device=device)
    offsets = torch.tensor([2, 0, 9], device=device)
    x = torch.randn(20, 3, 16, device=device, requires_grad=True)
    dout = torch.randn(20, 3, 16, device=device)
    results = []
    for name in ("cuda", "torch"):
        out = fastbert.apply_rotary(x, cos, sin, cu_seqlens=cu, max_seqlen=13, interleaved=True,
                                    seqlen_offsets=offsets, backend=name)
        results.append((out, *torch.autograd.grad(out, x, dout)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    w = torch.randn(24, 16, device=device, requires_grad=True)
    bias = torch.randn(24, device=device, requires_grad=True)
    dout = torch.randn(2, 9, 12, device=device)
    for b in (bias, None):
        results = []
        for name in ("cuda", "torch"):
            out = fastbert.linear_geglu(x, w, b, approximate="tanh", backend=name)
            wrt = (x, w) if b is None else (x, w, b)
            results.append((out, *torch.autograd.grad(out, wrt, dout)))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_public_ops_run_these_kernels():
    check_public_ops("cuda")
    device = torch.device("cuda")
    assert ops.resolve_backend("fastbert.apply_rotary", "auto", device, dtype=torch.bfloat16,
                               head_dim=64) == "cuda"


SANITIZER_SCRIPT = """
import torch
from fastbert import cuda as cb
torch.manual_seed(0)
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for d, half, interleaved in ((64, 32, False), (64, 32, True), (40, 10, True), (17, 8, False)):
        x = torch.randn(70, 3, 3, d, dtype=dtype, device="cuda")[:, 1]
        cos, sin = torch.rand(80, half, device="cuda"), torch.rand(80, half, device="cuda")
        pos = torch.arange(70, device="cuda")
        for conjugate in (False, True):
            cb.apply_rotary(x, cos, sin, pos, interleaved, conjugate)
            cb.apply_rotary(x, cos.to(dtype), sin.to(dtype), pos, interleaved, conjugate)
    x = torch.randn(13, 40, dtype=dtype, device="cuda")
    w = torch.randn(144, 40, dtype=dtype, device="cuda")
    for bias in (None, torch.randn(144, dtype=dtype, device="cuda")):
        out, pre = cb.linear_geglu_forward(x, w, bias, "none")
        cb.linear_geglu_backward(torch.randn_like(out), x, w, pre, "tanh")
        out, pre = cb.linear_geglu_forward(x, w[:70], None if bias is None else bias[:70], "none")
        cb.linear_geglu_backward(torch.randn_like(out), x, w[:70], pre, "none")
torch.cuda.synchronize()
"""


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_is_clean(tool):
    from tests.test_cuda import _sanitizer

    exe = _sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer is not installed")
    cmd = [exe, "--tool", tool, "--error-exitcode", "99", "--kernel-name", "kns=fastbert",
           sys.executable, "-c", SANITIZER_SCRIPT]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
