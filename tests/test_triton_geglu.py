"""Triton linear_geglu (the GeGLU in the GEMM epilogue, fused dGeGLU + dbias) against the
reference, forward and every gradient.

- interpreter: `TRITON_INTERPRET=1 python -m pytest -q -m interpreter tests/test_triton_geglu.py`
  (bf16 dot operands are upcast under the interpreter, as the launcher's UPCAST_DOT does)
"""
from __future__ import annotations

import os

import pytest
import torch

import fastbert
from fastbert import reference
from fastbert.triton import geglu
from tests.helpers import assert_close_by_rule, rule_factor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def _grads(dout, x, w, pre, approximate):
    return reference.linear_geglu_backward(dout, x, w, pre, approximate)


@pytest.mark.interpreter
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n", [(37, 24, 40), (1, 16, 8), (70, 48, 33)])
def test_forward_and_backward_by_rule(with_bias, approximate, dtype, m, k, n):
    torch.manual_seed(0)
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    w = (torch.randn(2 * n, k, device=DEVICE) * k ** -0.5).to(dtype)
    b = torch.randn(2 * n, dtype=dtype, device=DEVICE) if with_bias else None
    dout = torch.randn(m, n, dtype=dtype, device=DEVICE)
    out, pre = geglu.linear_geglu_forward(x, w, b, approximate)
    got = (out, *geglu.linear_geglu_backward(dout, x, w, pre, approximate))
    plain_out, plain_pre = reference.linear_geglu_forward(x, w, b, approximate, upcast=False)
    plain = (plain_out, *_grads(dout, x, w, plain_pre, approximate))
    xd, wd, dd = x.double(), w.double(), dout.double()
    exact_out, exact_pre = reference.linear_geglu_forward(xd, wd, b.double() if with_bias else None,
                                                          approximate)
    exact = (exact_out, *_grads(dd, xd, wd, exact_pre, approximate))
    for name, a, p, e in zip(("out", "dx", "dweight", "dbias"), got, plain, exact):
        assert_close_by_rule(a, p, e, f"geglu {name}", factor=rule_factor(dtype))
    assert_close_by_rule(pre, plain_pre, exact_pre, "geglu pre", factor=rule_factor(dtype))


@pytest.mark.interpreter
@pytest.mark.parametrize("with_bias", [False, True])
def test_inference_forward_skips_the_pre_activation(with_bias, monkeypatch):
    """store_pre=False (the op without grad, the lean ModernBERT plan in inference): the same
    output bit for bit, no (M, 2N) pre-activation written."""
    torch.manual_seed(2)
    x = torch.randn(45, 32, device=DEVICE)
    w = torch.randn(2 * 24, 32, device=DEVICE) * 32 ** -0.5
    b = torch.randn(2 * 24, device=DEVICE) if with_bias else None
    out, pre = geglu.linear_geglu_forward(x, w, b, "none")
    lean_out, no_pre = fastbert.geglu.forward_for_inference("triton")(x, w, b, "none")
    assert torch.equal(lean_out, out) and tuple(no_pre.shape) == (0, 48)
    stored = []
    forward = geglu.linear_geglu_forward
    backend = fastbert.ops._backend_module("triton")  # fastbert.triton: what the op calls
    monkeypatch.setattr(backend, "linear_geglu_forward", lambda *args, store_pre=True: (
        stored.append(store_pre), forward(*args, store_pre=store_pre))[1])
    with torch.no_grad():
        assert torch.equal(fastbert.linear_geglu(x, w, b, backend="triton"), out)
    assert stored == [False]


@pytest.mark.interpreter
def test_op_on_triton_matches_torch_backend_with_gradients():
    torch.manual_seed(1)
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(24, 16, device=DEVICE, requires_grad=True)
    results = []
    for backend in ("triton", "torch"):
        out = fastbert.linear_geglu(x, w, backend=backend)
        results.append((out, *torch.autograd.grad(out, (x, w), torch.ones_like(out))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.compile
@pytest.mark.parametrize("store_pre", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_compile_and_report_spills(capability, dtype, store_pre):
    """Every GPU config of the forward (ModernBERT has no Wi bias; training stores the
    pre-activation, inference not) and the backward pass compile for sm_80/sm_90; which spill
    is reported."""
    from fastbert.triton import linear_gelu as lg
    from tests.helpers import compile_resources
    from tests.test_triton_linear_gelu import _bwd_signature, _fwd_signature
    spilling = []
    for config in geglu.GPU_CONFIGS:
        constexprs = dict(HAS_BIAS=False, **lg.forward_constexprs(dtype, "none", store_pre),
                          **config.kwargs)
        usage = compile_resources("fastbert.triton.geglu", "_linear_geglu_fwd_kernel",
                                  _fwd_signature(dtype), constexprs, capability,
                                  config.num_warps, config.num_stages)
        if usage["stack"] or usage["spill_stores"]:
            spilling.append((config.kwargs, config.num_warps, usage["spill_stores"]))
    usage = compile_resources("fastbert.triton.geglu", "_geglu_bwd_dbias_kernel",
                              _bwd_signature(dtype),
                              dict(APPROXIMATE_TANH=False, BLOCK_M=lg.BWD_BLOCK_M,
                                   BLOCK_N=geglu.BWD_BLOCK_N), capability, lg.BWD_NUM_WARPS, 3)
    assert usage["stack"] == 0 and usage["spill_stores"] == 0, usage
    assert not spilling, f"forward configs that spill on sm_{capability}: {spilling}"


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,intermediate", [(768, 1152), (1024, 2624)],
                         ids=["ModernBERT-base", "ModernBERT-large"])
def test_gpu_modernbert_sizes_by_rule(hidden, intermediate):
    """Wi of ModernBERT-base/large (no bias) on 8 x 512 tokens in bf16: the compiled GEMM with
    the GeGLU epilogue and backward against the reference by the rule; inference's output
    without the pre-activation store bit for bit the same."""
    torch.manual_seed(3)
    m, dtype = 4096, torch.bfloat16
    x = torch.randn(m, hidden, dtype=dtype, device=DEVICE)
    w = (torch.randn(2 * intermediate, hidden, device=DEVICE) * hidden ** -0.5).to(dtype)
    dout = torch.randn(m, intermediate, dtype=dtype, device=DEVICE)
    out, pre = geglu.linear_geglu_forward(x, w, None, "none")
    got = (out, *geglu.linear_geglu_backward(dout, x, w, pre, "none")[:2])
    plain_out, plain_pre = reference.linear_geglu_forward(x, w, None, "none", upcast=False)
    plain = (plain_out, *_grads(dout, x, w, plain_pre, "none")[:2])
    exact_out, exact_pre = reference.linear_geglu_forward(x.double(), w.double(), None, "none")
    exact = (exact_out, *_grads(dout.double(), x.double(), w.double(), exact_pre, "none")[:2])
    for name, a, p, e in zip(("out", "dx", "dweight"), got, plain, exact):
        assert_close_by_rule(a, p, e, f"geglu {name}", factor=rule_factor(dtype))
    assert torch.equal(fastbert.geglu.forward_for_inference("triton")(x, w, None, "none")[0], out)
