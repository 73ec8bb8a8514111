"""The CUDA C++ backend (fastbert._C + fastbert/cuda.py) vs fastbert.reference: the extension,
Philox, add_layer_norm, linear + bias + GELU, the whole model, compute-sanitizer. Attention is in
tests/test_cuda_attention.py (gpu tier and host emulation) and tests/test_cuda_attention_static.py
(fragment index math and machine code); shared helpers in tests/cuda_helpers.py.

- always: `unsupported` / arch rules (pure Python).
- compile: the extension was built by pip and imports without a GPU; calling a kernel without a
  GPU raises a clean RuntimeError naming the op; the Philox header, built for the host, gives
  Random123's known answers.
  `python -m pytest -m compile tests/test_cuda*.py`
- gpu: add_layer_norm (also its pre-norm form: the stored sum and the gradient reaching it) and
  linear_bias_gelu, forward and all gradients, by the tolerance rule (tests/helpers.py) against an
  fp64 reference, odd shapes, determinism, the public ops with backend="cuda", and the whole
  BertModel; compute-sanitizer on small cases of every op.
  With a GPU present, a built extension that cannot run there fails the gpu tests (unless
  FASTBERT_ALLOW_CUDA_SKIP=1).
  Dropout: the kernels' keep mask is read off their output (see layer_norm_keep_mask), then
  forward and every gradient are compared with the reference given that mask; keep rate,
  1 / (1 - p) scaling, same seed -> same bits.
  The check functions take the backend module and device: tests/test_cuda_emulation.py runs them
  in the compile tier on the real kernels under the host emulation (tests/cuda_emulation.py).
"""
from __future__ import annotations

import functools
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import fastbert
from fastbert import cuda as cuda_backend
from fastbert import ops, reference
from tests.cuda_helpers import (ALL_DTYPES, HALF_DTYPES, ROOT, assert_keep_rate,
                                philox4x32_10, require_built)
# autouse fixtures: imported, so they apply to every test in this module
from tests.cuda_helpers import extension_runs_here, poisoned_outputs  # noqa: F401
from tests.helpers import assert_close_by_rule, check_mixed_dtype_layer_norm, random_padding_mask


# --------------------------------------------------------------------------------------------
# always: what the backend says it can serve
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op, kw, words", [
    ("fastbert.attention", dict(dtype=torch.float64, head_dim=64, dropout_p=0.0), "float32"),
    ("fastbert.attention", dict(dtype=torch.float16, head_dim=80, dropout_p=0.0), "head dims"),
    ("fastbert.add_layer_norm", dict(dtype=torch.float16, hidden=8192, dropout_p=0.0), "4096"),
    ("fastbert.linear_bias_gelu", dict(dtype=torch.float64, in_features=8, out_features=8),
     "float16"),
])
def test_unsupported_says_why(op, kw, words):
    reason = cuda_backend.unsupported(op, **kw)
    assert reason is not None and words in reason


@pytest.mark.parametrize("op, kw", [
    ("fastbert.attention", dict(dtype=torch.float16, head_dim=32, dropout_p=0.0, causal=True,
                                has_mask=True)),
    ("fastbert.attention", dict(dtype=torch.bfloat16, head_dim=128, dropout_p=0.0, causal=False,
                                has_mask=False)),
    ("fastbert.attention", dict(dtype=torch.bfloat16, head_dim=64, dropout_p=0.1, causal=False,
                                has_mask=True)),
    ("fastbert.attention", dict(dtype=torch.float32, head_dim=128, dropout_p=0.1, causal=True,
                                has_mask=True)),
    ("fastbert.add_layer_norm", dict(dtype=torch.float32, hidden=4096, dropout_p=0.0)),
    ("fastbert.add_layer_norm", dict(dtype=torch.float16, hidden=768, dropout_p=0.1)),
    ("fastbert.linear_bias_gelu", dict(dtype=torch.bfloat16, in_features=768,
                                       out_features=3072)),
])
def test_supported_inputs(op, kw):
    assert cuda_backend.unsupported(op, **kw) is None


def test_arch_rules():
    runs = cuda_backend._arch_runs_on
    assert runs("90a", 90) and not runs("90a", 100) and not runs("90a", 89)
    assert runs("80", 80) and runs("80", 86) and runs("80", 90)  # SASS in-family, PTX above
    assert runs("80-real", 86) and not runs("80-real", 90)
    assert not runs("80", 75)


# --------------------------------------------------------------------------------------------
# compile: the extension built and imports here, without a GPU
# --------------------------------------------------------------------------------------------

@pytest.mark.compile
def test_extension_built_for_the_requested_archs():
    info = require_built()
    import fastbert._C as ext

    wanted = os.environ.get("FASTBERT_CUDA_ARCHS", "80;90a").split(";")
    assert info["archs"] == wanted == ext.archs.split(",")
    assert info["cuda_version"] and info["error"] is None


@pytest.mark.compile
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_kernels_without_gpu_raise_clean_errors():
    require_built()
    import fastbert._C as ext

    zero3 = (0, 0, 0)
    calls = {
        "fastbert.attention": [
            lambda: ext.attention_forward(0, 0, 0, 0, 0, 0, 1, 8, 8, 1, 64, zero3, zero3, zero3,
                                          zero3, False, -1, -1, 0.125, 0.1, 7, 0, 0),
            lambda: ext.attention_backward(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 8, 8, 1, 64,
                                           *([zero3] * 8), False, 4, 4, 0.125, 0.1, 7, 0, 0)],
        "fastbert.attention_varlen": [
            lambda: ext.attention_varlen_forward(0, 0, 0, 0, 0, 0, 0, 2, 8, 8, 8, 1, 64,
                                                 *([zero3] * 4), False, 2, -1, 0.125, 0.1, 7, 0,
                                                 0),
            lambda: ext.attention_varlen_backward(*([0] * 13), 2, 8, 8, 8, 1, 64,
                                                  *([zero3] * 8), True, -1, -1, 0.125, 0.0, 7, 1,
                                                  0)],
        "fastbert.add_layer_norm": [
            lambda: ext.add_layer_norm_forward(*([0] * 8), 4, 8, 1e-5, 0.1, 7, 0, 0, 0),
            lambda: ext.add_layer_norm_backward_parts(4, 8),
            lambda: ext.add_layer_norm_backward(*([0] * 12), 4, 8, 1, 0.1, 7, 0, 0, 0)],
        "fastbert.linear_bias_gelu": [
            lambda: ext.bias_gelu_forward(0, 0, 0, 0, 4, 8, False, 0, 0),
            lambda: ext.gelu_backward_parts(4, 8),
            lambda: ext.gelu_backward(0, 0, 0, 0, 0, 4, 8, 1, False, 0, 0)],
    }
    for op, fns in calls.items():
        for fn in fns:
            with pytest.raises(RuntimeError, match=op + ": no (usable )?CUDA device"):
                fn()
    reason = cuda_backend.unavailable_reason()
    assert reason is not None and "no CUDA device" in reason


# --------------------------------------------------------------------------------------------
# compile: Philox-4x32-10 (kernels/philox.cuh) built for the host, against known answers
# --------------------------------------------------------------------------------------------

# Random123's kat_vectors for philox4x32_10: (counter, key) -> output
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),  # pi's digits
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


PHILOX_HOST_PROGRAM = r"""
#include <cstdio>
#include "kernels/philox.cuh"
// stdin lines "c0 c1 c2 c3 k0 k1" (hex) -> "r0 r1 r2 r3"; then "p" lines -> dropout thresholds
int main() {
  unsigned c[4], k[2];
  while (std::scanf("%x %x %x %x %x %x", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]) == 6) {
    const fastbert::Philox4 r = fastbert::philox4x32(c[0], c[1], c[2], c[3], k[0], k[1]);
    std::printf("%08x %08x %08x %08x\n", r.x[0], r.x[1], r.x[2], r.x[3]);
  }
  double p;
  while (std::scanf(" p %lf", &p) == 1) std::printf("%u\n", fastbert::dropout_threshold(p));
  return 0;
}
"""


def test_python_philox_gives_the_known_answers():
    for counter, key, want in PHILOX_KNOWN_ANSWERS:
        assert philox4x32_10(counter, key) == want


@pytest.mark.compile
def test_philox_header_gives_known_answers(tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    source = tmp_path / "philox_kat.cpp"
    source.write_text(PHILOX_HOST_PROGRAM)
    exe = tmp_path / "philox_kat"
    subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT}",
                    str(source), "-o", str(exe)], check=True)
    rng = random.Random(1234)
    cases = [(c, k) for c, k, _ in PHILOX_KNOWN_ANSWERS] + [
        (tuple(rng.getrandbits(32) for _ in range(4)), tuple(rng.getrandbits(32) for _ in range(2)))
        for _ in range(300)]
    probs = [0.0, 0.1, 0.5, 0.999, 1 - 2 ** -33]
    stdin = "".join(" ".join(f"{x:x}" for x in c + k) + "\n" for c, k in cases)
    stdin += "".join(f"p {p!r}\n" for p in probs)
    run = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True)
    lines = run.stdout.split("\n")
    got = [tuple(int(w, 16) for w in line.split()) for line in lines[:len(cases)]]
    for (counter, key, want), g in zip(PHILOX_KNOWN_ANSWERS, got):
        assert g == want, (counter, key)
    for (counter, key), g in zip(cases, got):
        assert g == philox4x32_10(counter, key), (counter, key)
    thresholds = [int(x) for x in lines[len(cases):len(cases) + len(probs)]]
    assert thresholds == [min(round(p * 2 ** 32), 2 ** 32 - 1) for p in probs]


# --------------------------------------------------------------------------------------------
# gpu: add_layer_norm
# --------------------------------------------------------------------------------------------

def check_pre_norm_sum(s, x, residual, p, keep, tag):
    """The pre-norm sum dropout(x) + residual a kernel stored: x's dtype, its own buffer, by the
    tolerance rule against fp64 (plain: the same sum in x's dtype)."""
    assert s.dtype == x.dtype and s.shape == x.shape, tag
    assert s.data_ptr() not in (x.data_ptr(), residual.data_ptr() if residual is not None else 0)
    r64 = residual.double() if residual is not None else None
    exact = reference.prenorm_sum(x.double(), r64, p, keep, torch.float64)
    plain = reference.prenorm_sum(x, residual, p, keep, x.dtype)
    assert_close_by_rule(s, plain, exact, f"sum [{tag}]")


def check_layer_norm(rows, hidden, dtype, weight_dtype, with_residual, backend=cuda_backend,
                     device="cuda", x_offset=0, pre_norm=False):
    """x_offset > 0: x and residual start that many elements into their buffers (unaligned).
    pre_norm: the return_residual form (store_sum, and a gradient dsum reaching the sum)."""
    def rows_at_offset():
        flat = torch.randn(rows * hidden + x_offset, dtype=dtype, device=device)
        return flat[x_offset:].view(rows, hidden)

    x = rows_at_offset()
    residual = rows_at_offset() if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(weight_dtype)
    bias = (0.1 * torch.randn(hidden, device=device)).to(weight_dtype)
    dy = torch.randn_like(x)
    dsum = torch.randn_like(x) if pre_norm else None
    eps = 1e-5

    y, mean, rstd, *s = backend.add_layer_norm_forward(x, residual, weight, bias, eps, 0.0, 0,
                                                       store_sum=pre_norm)
    dx, dres, dw, db = backend.add_layer_norm_backward(dy, x, residual, weight, mean, rstd, 0.0, 0,
                                                       dsum=dsum)
    assert y.dtype == dtype and dw.dtype == weight_dtype and db.dtype == weight_dtype
    assert (dres is None) == (residual is None) and len(s) == pre_norm

    r64 = residual.double() if residual is not None else None
    x64, w64, b64, dy64 = x.double(), weight.double(), bias.double(), dy.double()
    ds64 = dsum.double() if pre_norm else None
    ey, emean, erstd = reference.add_layer_norm_forward(x64, r64, w64, b64, eps)
    edx, edres, edw, edb = reference.add_layer_norm_backward(dy64, x64, r64, w64, emean, erstd,
                                                             dsum=ds64)
    py, pmean, prstd = reference.add_layer_norm_forward(x, residual, weight, bias, eps,
                                                        upcast=False)
    pdx, pdres, pdw, pdb = reference.add_layer_norm_backward(dy, x, residual, weight, pmean,
                                                             prstd, dsum=dsum)
    tag = (f"rows{rows} hidden{hidden} {dtype} weight {weight_dtype} residual={with_residual} "
           f"x_offset={x_offset} pre_norm={pre_norm}")
    torch.testing.assert_close(mean.double(), emean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), erstd, rtol=1e-4, atol=1e-5)
    assert_close_by_rule(y, py, ey, f"y [{tag}]")
    if pre_norm:
        check_pre_norm_sum(s[0], x, residual, 0.0, None, tag)
        # the same pass as the plain form: y and the statistics do not change
        plain = backend.add_layer_norm_forward(x, residual, weight, bias, eps, 0.0, 0)
        assert all(torch.equal(a, b) for a, b in zip((y, mean, rstd), plain)), tag
    assert_close_by_rule(dx, pdx, edx, f"dx [{tag}]")
    if residual is not None:
        assert torch.equal(dres, dx) and dres.data_ptr() != dx.data_ptr()
    assert_close_by_rule(dw, pdw, edw, f"dweight [{tag}]")
    assert_close_by_rule(db, pdb, edb, f"dbias [{tag}]")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 32), (37, 100), (300, 384), (64, 768),
                                          (33, 1024), (20, 1536), (7, 4096), (9, 1030)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_add_layer_norm_matches_reference(rows, hidden, dtype, with_residual, pre_norm):
    check_layer_norm(rows, hidden, dtype, dtype, with_residual, pre_norm=pre_norm)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("hidden", [768, 2048])
def test_add_layer_norm_fp32_weight(dtype, hidden):
    check_layer_norm(50, hidden, dtype, torch.float32, True)


@pytest.mark.gpu
def test_add_layer_norm_autocast_mixed_dtypes():
    """CUDA autocast's norm: bf16 x beside the fp32 residual stream, y in fp32."""
    check_mixed_dtype_layer_norm(cuda_backend, device="cuda", rows=300, hidden=768,
                                 pre_norm=True)


@pytest.mark.gpu
def test_add_layer_norm_backward_is_deterministic():
    x = torch.randn(4096, 768, dtype=torch.float16, device="cuda")
    residual, dy = torch.randn_like(x), torch.randn_like(x)
    weight = torch.randn(768, device="cuda")
    bias = torch.randn(768, device="cuda")
    _, mean, rstd = cuda_backend.add_layer_norm_forward(x, residual, weight, bias, 1e-12, 0.0, 0)
    first = cuda_backend.add_layer_norm_backward(dy, x, residual, weight, mean, rstd, 0.0, 0)
    for _ in range(3):
        again = cuda_backend.add_layer_norm_backward(dy, x, residual, weight, mean, rstd, 0.0, 0)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_public_add_layer_norm_op_runs_these_kernels():
    x = torch.randn(2, 9, 768, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    weight = torch.randn(768, device="cuda", requires_grad=True)
    bias = torch.randn(768, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    y = fastbert.add_layer_norm(x, residual, weight, bias, 1e-12, backend="cuda")
    y.backward(dy)

    x2, r2, dy2 = (t.detach().reshape(18, 768) for t in (x, residual, dy))
    want_y, mean, rstd = cuda_backend.add_layer_norm_forward(x2, r2, weight.detach(),
                                                             bias.detach(), 1e-12, 0.0, 0)
    want = cuda_backend.add_layer_norm_backward(dy2, x2, r2, weight.detach(), mean, rstd, 0.0, 0)
    assert torch.equal(y.reshape(18, 768), want_y)
    for got, w in zip((x.grad, residual.grad, weight.grad, bias.grad), want):
        assert torch.equal(got.reshape(w.shape), w)


def check_public_pre_norm(device):
    """fastbert.add_layer_norm(..., return_residual=True, backend="cuda") through autograd matches
    the torch backend in fp32 (1e-5): y, the sum and every gradient, with gradients reaching both
    outputs and the sum alone; with and without residual and bias."""
    x = torch.randn(2, 9, 40, device=device, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(40, device=device)).requires_grad_()
    bias = (0.1 * torch.randn(40, device=device)).requires_grad_()
    dy, dsum = torch.randn_like(x), torch.randn_like(x)
    for r, b, uses in ((residual, bias, "both"), (None, None, "both"), (residual, None, "sum")):
        leaves = [t for t in (x, r, weight, b) if t is not None]
        results = []
        for name in ("cuda", "torch"):
            y, s = fastbert.add_layer_norm(x, r, weight, b, 1e-5, return_residual=True,
                                           backend=name)
            outputs, grads = ((y, s), (dy, dsum)) if uses == "both" else ((s,), (dsum,))
            results.append((y, s, *torch.autograd.grad(outputs, leaves, grads)))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_public_add_layer_norm_pre_norm_runs_these_kernels():
    check_public_pre_norm("cuda")
    assert ops.resolve_backend("fastbert.add_layer_norm", "cuda", torch.device("cuda"),
                               dtype=torch.bfloat16, hidden=768, dropout_p=0.1,
                               store_sum=True) == "cuda"


def layer_norm_keep_mask(backend, device, rows, hidden, dtype, p, seed):
    """The keep mask (rows, hidden) a backend draws for `seed`, read off its output: with x = 1,
    no residual, weight 1 and bias 0 the pre-norm sum is 1 / (1 - p) where kept and 0 where
    dropped, so y > 0 exactly where kept (when a row has both)."""
    x = torch.ones(rows, hidden, dtype=dtype, device=device)
    weight = torch.ones(hidden, dtype=dtype, device=device)
    y, mean, _ = backend.add_layer_norm_forward(x, None, weight, torch.zeros_like(weight), 1e-5,
                                                p, seed)
    keep = y > 0
    assert (keep.any(1) & ~keep.all(1)).all(), "a row kept or dropped everything: pick other sizes"
    # the mean of the pre-norm sum is (fraction kept) / (1 - p): checks the 1 / (1 - p) scale
    torch.testing.assert_close(mean.double(), keep.double().mean(1) / (1 - p), rtol=1e-5,
                               atol=1e-6)
    return keep


def check_layer_norm_dropout(backend, device, rows, hidden, dtype, with_residual, p,
                             seed=424242, pre_norm=False):
    """pre_norm: the return_residual form, whose sum and backward use the plain form's mask."""
    keep = layer_norm_keep_mask(backend, device, rows, hidden, dtype, p, seed)
    assert_keep_rate(keep, p, "add_layer_norm")

    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    residual = torch.randn_like(x) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    bias = (0.1 * torch.randn(hidden, device=device)).to(dtype)
    dy = torch.randn_like(x)
    dsum = torch.randn_like(x) if pre_norm else None
    eps = 1e-5
    forward = functools.partial(backend.add_layer_norm_forward, x, residual, weight, bias, eps, p,
                                store_sum=pre_norm)
    backward = functools.partial(backend.add_layer_norm_backward, dy, x, residual, weight,
                                 dsum=dsum)
    y, mean, rstd, *s = forward(seed)
    dx, dres, dw, db = backward(mean, rstd, p, seed)

    r64 = residual.double() if residual is not None else None
    x64, w64, b64, dy64 = x.double(), weight.double(), bias.double(), dy.double()
    ds64 = dsum.double() if pre_norm else None
    ey, emean, erstd = reference.add_layer_norm_forward(x64, r64, w64, b64, eps, p, keep)
    edx, edres, edw, edb = reference.add_layer_norm_backward(dy64, x64, r64, w64, emean, erstd,
                                                             p, keep, dsum=ds64)
    py, pmean, prstd = reference.add_layer_norm_forward(x, residual, weight, bias, eps, p, keep,
                                                        upcast=False)
    pdx, pdres, pdw, pdb = reference.add_layer_norm_backward(dy, x, residual, weight, pmean,
                                                             prstd, p, keep, dsum=dsum)
    tag = f"rows{rows} hidden{hidden} {dtype} residual={with_residual} p={p} pre_norm={pre_norm}"
    torch.testing.assert_close(mean.double(), emean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), erstd, rtol=1e-4, atol=1e-5)
    assert_close_by_rule(y, py, ey, f"y [{tag}]")
    if pre_norm:
        check_pre_norm_sum(s[0], x, residual, p, keep, tag)
    assert_close_by_rule(dx, pdx, edx, f"dx [{tag}]")
    assert (dx[~keep] == 0).all(), tag  # backward regenerated forward's mask
    if residual is not None:
        assert_close_by_rule(dres, pdres, edres, f"dresidual [{tag}]")
    assert_close_by_rule(dw, pdw, edw, f"dweight [{tag}]")
    assert_close_by_rule(db, pdb, edb, f"dbias [{tag}]")

    again = forward(seed)
    assert all(torch.equal(a, b) for a, b in zip((y, mean, rstd, *s), again)), tag
    grads_again = backward(mean, rstd, p, seed)
    assert all(torch.equal(a, b) for a, b in zip((dx, dw, db), grads_again[:1] + grads_again[2:]))
    other = forward(seed + 1)
    assert not torch.equal(y, other[0]), tag


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows, hidden", [(37, 100), (64, 768), (9, 1030), (7, 1536),
                                          (5, 4096)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_add_layer_norm_dropout_matches_reference_with_its_mask(rows, hidden, dtype,
                                                                with_residual, p, pre_norm):
    check_layer_norm_dropout(cuda_backend, "cuda", rows, hidden, dtype, with_residual, p,
                             pre_norm=pre_norm)


# --------------------------------------------------------------------------------------------
# gpu: linear + bias + GELU
# --------------------------------------------------------------------------------------------

def check_linear_gelu(m, k, n, dtype, approximate, backend=cuda_backend, device="cuda"):
    x = torch.randn(m, k, dtype=dtype, device=device)
    weight = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype)
    bias = torch.randn(n, dtype=dtype, device=device)
    dout = torch.randn(m, n, dtype=dtype, device=device)

    out, pre = backend.linear_bias_gelu_forward(x, weight, bias, approximate)
    dx, dw, db = backend.linear_bias_gelu_backward(dout, x, weight, pre, approximate)
    assert out.shape == (m, n) and out.dtype == dtype and pre.dtype == dtype

    x64, w64, b64, do64 = x.double(), weight.double(), bias.double(), dout.double()
    eout, epre = reference.linear_bias_gelu_forward(x64, w64, b64, approximate)
    edx, edw, edb = reference.linear_bias_gelu_backward(do64, x64, w64, epre, approximate)
    pout, ppre = reference.linear_bias_gelu_forward(x, weight, bias, approximate, upcast=False)
    pdx, pdw, pdb = reference.linear_bias_gelu_backward(dout, x, weight, ppre, approximate)
    tag = f"m{m} k{k} n{n} {dtype} {approximate}"
    assert_close_by_rule(out, pout, eout, f"out [{tag}]")
    assert_close_by_rule(dx, pdx, edx, f"dx [{tag}]")
    assert_close_by_rule(dw, pdw, edw, f"dweight [{tag}]")
    assert_close_by_rule(db, pdb, edb, f"dbias [{tag}]")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("m, k, n", [(1, 64, 96), (37, 48, 130), (256, 128, 333),
                                     (512, 768, 3072)])
def test_linear_bias_gelu_matches_reference(m, k, n, dtype, approximate):
    check_linear_gelu(m, k, n, dtype, approximate)


@pytest.mark.gpu
def test_linear_bias_gelu_backward_is_deterministic():
    x = torch.randn(2048, 256, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(1024, 256, dtype=torch.bfloat16, device="cuda") / 16
    bias = torch.randn(1024, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn(2048, 1024, dtype=torch.bfloat16, device="cuda")
    _, pre = cuda_backend.linear_bias_gelu_forward(x, weight, bias, "none")
    first = cuda_backend.linear_bias_gelu_backward(dout, x, weight, pre, "none")
    again = cuda_backend.linear_bias_gelu_backward(dout, x, weight, pre, "none")
    assert torch.equal(first[2], again[2])  # dbias: the part the extension reduces


@pytest.mark.gpu
def test_public_linear_bias_gelu_op_runs_these_kernels():
    x = torch.randn(3, 7, 64, dtype=torch.float16, device="cuda", requires_grad=True)
    weight = (torch.randn(200, 64, device="cuda") / 8).half().requires_grad_()
    bias = torch.randn(200, dtype=torch.float16, device="cuda", requires_grad=True)
    dout = torch.randn(3, 7, 200, dtype=torch.float16, device="cuda")
    out = fastbert.linear_bias_gelu(x, weight, bias, approximate="tanh", backend="cuda")
    out.backward(dout)

    x2, do2 = x.detach().reshape(21, 64), dout.reshape(21, 200)
    want_out, pre = cuda_backend.linear_bias_gelu_forward(x2, weight.detach(), bias.detach(),
                                                          "tanh")
    want = cuda_backend.linear_bias_gelu_backward(do2, x2, weight.detach(), pre, "tanh")
    assert torch.equal(out.reshape(21, 200), want_out)
    for got, w in zip((x.grad, weight.grad, bias.grad), want):
        assert torch.equal(got.reshape(w.shape), w)


# --------------------------------------------------------------------------------------------
# gpu: the whole model
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_bert_model_cuda_backend_matches_torch_backend(dtype):
    from fastbert.model import BertConfig, BertModel

    config = BertConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=1024,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(config).cuda().eval()
    ids = torch.randint(0, 512, (3, 70), device="cuda")
    mask = random_padding_mask(3, 70, "cuda", mode="third")
    results = {}
    previous = fastbert.get_backend()
    try:
        for backend, dt in (("cuda", dtype), ("torch", dtype), ("torch", torch.float64)):
            fastbert.set_backend(backend)
            m = model.to(dt)
            m.zero_grad(set_to_none=True)
            hidden = m(ids, attention_mask=mask).last_hidden_state
            hidden.float().pow(2).mean().backward()
            grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()
                     if p.grad is not None}
            results[(backend, dt)] = (hidden.detach().clone(), grads)
    finally:
        fastbert.set_backend(previous)
    kernel, plain, exact = (results[("cuda", dtype)], results[("torch", dtype)],
                            results[("torch", torch.float64)])
    real = mask.unsqueeze(-1).expand_as(kernel[0])  # padded positions are not compared
    assert_close_by_rule(kernel[0][real], plain[0][real], exact[0][real], "last_hidden_state",
                         factor=3.0)
    for name, g in kernel[1].items():
        assert torch.isfinite(g).all(), name
        assert_close_by_rule(g, plain[1][name], exact[1][name], f"grad {name}", factor=3.0,
                             floor=2e-2 * exact[1][name].abs().max().item())


# --------------------------------------------------------------------------------------------
# gpu: compute-sanitizer on small cases
# --------------------------------------------------------------------------------------------

SANITIZER_SCRIPT = """
import torch
from fastbert import cuda as cb
torch.manual_seed(0)
for dtype in (torch.float16, torch.bfloat16):
    for d in (32, 64, 128):
        for sq, sk, causal in ((70, 70, False), (33, 90, True), (90, 33, True)):
            q = torch.randn(2, sq, 2, d, dtype=dtype, device="cuda")
            k = torch.randn(2, sk, 2, d, dtype=dtype, device="cuda")
            v = torch.randn_like(k)
            mask = torch.arange(sk, device="cuda") < torch.tensor([[sk // 2], [0]], device="cuda")
            for p in (0.0, 0.2):
                out, lse = cb.attention_forward(q, k, v, mask, causal, p, 0.1, 7)
                for det in (False, True):
                    cb.attention_backward(torch.randn_like(out), q, k, v, out, lse, mask, causal,
                                          p, 0.1, 7, det)
        cu = torch.tensor([0, 0, 37, 37, 170, 171], dtype=torch.int32, device="cuda")
        qkv = torch.randn(171, 3, 2, d, dtype=dtype, device="cuda")
        q, k, v = qkv.unbind(1)
        for causal, p, det in ((False, 0.0, False), (True, 0.2, True)):
            out, lse = cb.attention_varlen_forward(q, k, v, cu, cu, 133, 133, causal, p, 0.1, 7)
            cb.attention_varlen_backward(torch.randn_like(out), q, k, v, out, lse, cu, cu, 133,
                                         133, causal, p, 0.1, 7, det)
    for hidden in (100, 768, 2048):
        x = torch.randn(9, hidden, dtype=dtype, device="cuda")
        w = torch.randn(hidden, device="cuda")
        for p, pre_norm in ((0.0, False), (0.2, False), (0.0, True), (0.2, True)):
            y, mean, rstd, *s = cb.add_layer_norm_forward(x, x.clone(), w, w.clone(), 1e-5, p, 7,
                                                          store_sum=pre_norm)
            cb.add_layer_norm_backward(torch.randn_like(y), x, x.clone(), w, mean, rstd, p, 7,
                                       dsum=torch.randn_like(y) if pre_norm else None)
    x = torch.randn(13, 40, dtype=dtype, device="cuda")
    w = torch.randn(72, 40, dtype=dtype, device="cuda")
    out, pre = cb.linear_bias_gelu_forward(x, w, torch.randn(72, dtype=dtype, device="cuda"),
                                           "none")
    cb.linear_bias_gelu_backward(torch.randn_like(out), x, w, pre, "none")
torch.cuda.synchronize()
"""


def _sanitizer():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "compute-sanitizer")):
            return os.path.join(home, "bin", "compute-sanitizer")
    return shutil.which("compute-sanitizer")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_is_clean(tool):
    exe = _sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer is not installed")
    # only fastbert's kernels are instrumented (torch's own kernels are not under test)
    cmd = [exe, "--tool", tool, "--error-exitcode", "99", "--kernel-name", "kns=fastbert",
           sys.executable, "-c", SANITIZER_SCRIPT]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
