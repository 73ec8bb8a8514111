"""Triton attention with a sliding window (window_size, flash-attn's meaning), padded and varlen,
forward and backward (both dQ paths), against the reference with a dense band mask.

- interpreter: `TRITON_INTERPRET=1 python -m pytest -q -m interpreter tests/test_triton_window.py`
  (bf16 dot operands are upcast under the interpreter, as fastbert.triton.attention.exact_dot
  does: the interpreter computes bf16 tl.dot wrongly)
"""
from __future__ import annotations

import os

import pytest
import torch

from fastbert import reference
from fastbert.triton import attention as kernels
from fastbert.triton import attention_varlen as varlen
from tests.helpers import (assert_close_by_rule, check_out_of_band_tiles_are_never_read, poison_,
                           random_padding_mask, rule_factor)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    monkeypatch.setattr(kernels, "_alloc", lambda shape, dtype, device: poison_(
        torch.empty(shape, dtype=dtype, device=device)))


def _reference(q, k, v, mask, causal, window, dout, upcast):
    """(out, dq, dk, dv) of the reference math with the band as a dense mask."""
    b, sq, _, _ = q.shape
    visible = reference.attention_visible(mask, causal, b, sq, k.shape[1], q.device, window)
    out, lse = reference.attention_forward(q, k, v, None, False, 0.0, None, None, upcast,
                                           visible=visible)
    grads = reference.attention_backward(dout, q, k, v, out, lse, None, False, 0.0, None, None,
                                         upcast, visible=visible)
    return (out, *grads)


def _check(got, q, k, v, mask, causal, window, dout, name):
    plain = _reference(q, k, v, mask, causal, window, dout, upcast=False)
    exact = _reference(*(t.double() for t in (q, k, v)), mask, causal, window, dout.double(),
                       upcast=True)
    for what, a, b, c in zip(("out", "dq", "dk", "dv"), got, plain, exact):
        assert_close_by_rule(a, b, c, f"{name} {what}", factor=rule_factor(q.dtype))


CASES = [  # (sq, sk, causal, window)
    (70, 70, False, (5, 9)),
    (70, 70, True, (20, -1)),
    (70, 70, False, (0, 0)),
    (33, 70, False, (-1, 3)),
    (70, 33, True, (8, 8)),
    (1, 1, False, (0, 0)),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("sq,sk,causal,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("deterministic", [False, True])
def test_padded_window(sq, sk, causal, window, dtype, deterministic):
    torch.manual_seed(0)
    q = torch.randn(2, sq, 2, 40, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(2, sk, 2, 40, dtype=dtype, device=DEVICE) for _ in range(2))
    mask = random_padding_mask(2, sk, DEVICE, mode="third")
    dout = torch.randn_like(q)
    scale = 40 ** -0.5
    out, lse = kernels.attention_forward(q, k, v, mask, causal, 0.0, scale, 0, window=window)
    grads = kernels.attention_backward(dout, q, k, v, out, lse, mask, causal, 0.0, scale, 0,
                                       deterministic, window=window)
    _check((out, *grads), q, k, v, mask, causal, window, dout, f"{window} causal={causal}")


@pytest.mark.interpreter
@pytest.mark.parametrize("causal,window", [(False, (5, 9)), (True, (12, -1)), (False, (64, 64))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("deterministic", [False, True])
def test_varlen_window(causal, window, dtype, deterministic):
    torch.manual_seed(1)
    # 300: query tiles whose band has key tiles needing only the left bound, only the right
    # one, or both (the forward runs them in separate loops)
    lengths = [70, 0, 1, 33, 130, 300]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                      device=DEVICE)
    q, k, v = torch.randn(int(cu[-1]), 3, 2, 16, dtype=dtype, device=DEVICE).unbind(1)
    dout = torch.randn_like(q)
    scale = 0.25
    top = max(lengths)
    out, lse = varlen.attention_varlen_forward(q, k, v, cu, cu, top, top, causal, 0.0, scale, 0,
                                               window=window)
    dq, dk, dv = varlen.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, top, top,
                                                  causal, 0.0, scale, 0, deterministic,
                                                  window=window)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        rows = slice(int(cu[b]), int(cu[b + 1]))
        one = [t[rows].unsqueeze(0) for t in (q, k, v, dout)]
        got = [t[rows].unsqueeze(0) for t in (out, dq, dk, dv)]
        _check(got, *one[:3], None, causal, window, one[3], f"varlen seq {b} {window}")


@pytest.mark.interpreter
def test_window_with_dropout_stays_in_the_band():
    """Dropout composes: a query's output, and its gradient, reach only the keys in its band."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 90, 1, 16, device=DEVICE) for _ in range(3))
    out, lse = kernels.attention_forward(q, k, v, None, False, 0.3, 0.25, 5, window=(3, 2))
    again, _ = kernels.attention_forward(q, k, v, None, False, 0.3, 0.25, 5, window=(3, 2))
    assert torch.equal(out, again)
    dout = torch.zeros_like(q)
    dout[0, 40] = 1.0
    _, dk, dv = kernels.attention_backward(dout, q, k, v, out, lse, None, False, 0.3, 0.25, 5,
                                           True, window=(3, 2))
    touched = (dk.abs().sum((-1, -2)) + dv.abs().sum((-1, -2)))[0].nonzero().flatten().tolist()
    assert touched and set(touched) <= set(range(37, 43))


@pytest.mark.interpreter
@pytest.mark.parametrize("queries_cut", [False, True])
def test_out_of_band_tiles_are_never_read(queries_cut):
    torch.manual_seed(3)
    # queries_cut: the dQ kernel's 128-query tiles; rows 256..383 share one with in-band rows
    check_out_of_band_tiles_are_never_read(kernels, DEVICE, 32, torch.float16, queries_cut,
                                           cut=256 if queries_cut else 320)


# gpu tier: a few of the cases above on the GPU's compiled kernels (each new specialization
# compiles; scripts/gpu_check.sh gives the Triton gpu tests 150 s)
@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("sq,sk,causal,window", [CASES[0], CASES[4]])
def test_gpu_padded_window(sq, sk, causal, window, deterministic):
    test_padded_window(sq, sk, causal, window, torch.bfloat16, deterministic)


@pytest.mark.gpu
def test_gpu_varlen_window_and_out_of_band_tiles():
    test_varlen_window(False, (64, 64), torch.float16, False)
    # 256 poisoned keys: a multiple of every key tile (sm_80's dK/dV takes 128)
    check_out_of_band_tiles_are_never_read(kernels, DEVICE, 64, torch.float16, False, cut=256)
