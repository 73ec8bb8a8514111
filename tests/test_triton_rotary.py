"""Triton rotary embeddings (fastbert.apply_rotary on the Triton backend) against the reference.

- interpreter: `TRITON_INTERPRET=1 python -m pytest -q -m interpreter tests/test_triton_rotary.py`
- compile: the kernel compiles ahead of time for sm_80 and sm_90 without spills
"""
from __future__ import annotations

import os

import pytest
import torch

import fastbert
from fastbert import reference
from fastbert.triton import rotary
from tests.helpers import assert_close_by_rule, rule_factor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

def _cos_sin(positions, half):
    angles = torch.rand(positions, half, dtype=torch.float64) * 6.3
    return angles.cos(), angles.sin()


@pytest.mark.interpreter
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("conjugate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim,half", [(16, 8), (40, 12), (64, 32)])
def test_kernel_by_rule(interleaved, conjugate, dtype, head_dim, half):
    torch.manual_seed(0)
    cos, sin = _cos_sin(50, half)
    qkv = torch.randn(2, 17, 3, 5, head_dim, dtype=dtype, device=DEVICE)
    x = qkv[:, :, :2].flatten(2, 3)  # (B, S, 2H, D) strided view: q and k heads together
    positions = torch.arange(17, device=DEVICE).view(1, 17) + torch.tensor([[0], [30]],
                                                                            device=DEVICE)
    got = rotary.apply_rotary(x, cos.float().to(DEVICE), sin.float().to(DEVICE), positions,
                              interleaved, conjugate)
    plain = reference.rotary_forward(x, cos.to(dtype), sin.to(dtype), positions, interleaved,
                                     conjugate, upcast=False)
    exact = reference.rotary_forward(x.double(), cos, sin, positions, interleaved, conjugate)
    assert got.is_contiguous() and got.shape == x.shape
    assert_close_by_rule(got, plain, exact, "rotary", factor=rule_factor(dtype))


@pytest.mark.interpreter
def test_op_on_triton_matches_torch_backend_packed_with_gradients():
    torch.manual_seed(1)
    cos, sin = (t.float().to(DEVICE) for t in _cos_sin(40, 8))
    cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32, device=DEVICE)
    x = torch.randn(20, 3, 16, device=DEVICE, requires_grad=True)
    outs, grads = [], []
    for backend in ("triton", "torch"):
        out = fastbert.apply_rotary(x, cos, sin, cu_seqlens=cu, max_seqlen=13, seqlen_offsets=2,
                                    backend=backend)
        (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
        outs.append(out)
        grads.append(dx)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)


@pytest.mark.compile
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_compiles_without_spills(capability, dtype):
    """ModernBERT-base/large: head dim 64, all of it rotary; launched with Triton's default 4
    warps. fp32 cos/sin (as transformers' rotary module makes them under autocast) or the
    input's dtype."""
    from tests.helpers import TRITON_TYPE, compile_resources
    t = TRITON_TYPE[dtype]
    for table in ("fp32", t):
        signature = dict(X="*" + t, Cos="*" + table, Sin="*" + table, Pos="*i64", Out="*" + t,
                         stride_xr="i32", stride_xh="i32", stride_or="i32", stride_oh="i32",
                         stride_cos="i32", n_heads="i32", head_dim="i32", half="i32")
        for interleaved, conjugate in ((False, False), (False, True)):
            usage = compile_resources(
                "fastbert.triton.rotary", "_rotary_kernel", signature,
                dict(INTERLEAVED=interleaved, CONJUGATE=conjugate,
                     BLOCK_H=rotary.HEADS_PER_PROGRAM, BLOCK_HALF=32, BLOCK_D=1),
                capability, num_warps=4, num_stages=3)
            assert usage["stack"] == 0 and usage["spill_stores"] == 0, usage


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True])
def test_gpu_modernbert_base_sizes_by_rule(interleaved):
    """ModernBERT-base's q and k heads (2 x 12, head dim 64) of 8 x 512 tokens in bf16, the
    compiled kernel against the reference by the rule."""
    torch.manual_seed(4)
    cos, sin = _cos_sin(512, 32)
    x = torch.randn(8, 512, 24, 64, dtype=torch.bfloat16, device=DEVICE)
    positions = torch.arange(512, device=DEVICE).view(1, 512)
    got = rotary.apply_rotary(x, cos.float().to(DEVICE), sin.float().to(DEVICE), positions,
                              interleaved, False)
    plain = reference.rotary_forward(x, cos.to(DEVICE, x.dtype), sin.to(DEVICE, x.dtype),
                                     positions, interleaved, False, upcast=False)
    exact = reference.rotary_forward(x.double(), cos.to(DEVICE), sin.to(DEVICE), positions,
                                     interleaved, False)
    assert_close_by_rule(got, plain, exact, "rotary", factor=rule_factor(x.dtype))
