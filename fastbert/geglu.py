"""`fastbert.linear_geglu`: the input half of ModernBERT's MLP, gelu(x W_a^T + b_a) * (x W_g^T + b_g)
with weight = [W_a; W_g] stacked as ModernBERT's `Wi` (so `Wi(x).chunk(2, -1)` splits it), on
every backend that serves it, with backward.

Backend entry points (fastbert/ops.py describes the others):

    linear_geglu_forward(x, weight, bias, approximate) -> (out (M, N), pre (M, 2N))
    linear_geglu_backward(dout, x, weight, pre, approximate) -> (dx, dweight, dbias)

bias may be None; dbias is what a bias would get (dropped when there is none).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from fastbert import cpu, ops

OP = "fastbert.linear_geglu"


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str,
             backend: str) -> Tuple[Tensor, Tensor]:
    out, pre = ops._backend_module(backend).linear_geglu_forward(x, weight, bias, approximate)
    return out, pre


_fwd = torch.library.custom_op("fastbert::linear_geglu_fwd", mutates_args=())(_forward)


def forward_for_inference(backend: str) -> Callable[..., Tuple[Tensor, Tensor]]:
    """The backend's linear_geglu_forward for calls no gradient will follow: Triton's skips the
    (M, 2N) pre-activation store (its `pre` comes back empty)."""
    forward = ops._backend_module(backend).linear_geglu_forward
    return functools.partial(forward, store_pre=False) if backend == "triton" else forward


@_fwd.register_fake
def _(x, weight, bias, approximate, backend):
    m, n2 = x.shape[0], weight.shape[0]
    return x.new_empty(m, n2 // 2), x.new_empty(m, n2)


def _backward(dout: Tensor, x: Tensor, weight: Tensor, pre: Tensor, approximate: str,
              backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = ops._backend_module(backend).linear_geglu_backward(dout.contiguous(), x, weight,
                                                                    pre, approximate)
    return dx, dw, db


_bwd = torch.library.custom_op("fastbert::linear_geglu_bwd", mutates_args=())(_backward)


@_bwd.register_fake
def _(dout, x, weight, pre, approximate, backend):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _setup(ctx, inputs, output):
    x, weight, bias, approximate, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.has_bias, ctx.approximate, ctx.backend = bias is not None, approximate, backend
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled (M, 2N) gradient for the pre-activation


def _grad(ctx, dout, dpre):
    if dout is None:
        return (None,) * 5
    x, weight, pre = ctx.saved_tensors
    backward = ops._backward_impl(ctx, _bwd, _backward)
    dx, dw, db = backward(dout, x, weight, pre, ctx.approximate, ctx.backend)
    return dx, dw, (db if ctx.has_bias else None), None, None


_fwd.register_autograd(_grad, setup_context=_setup)


def linear_geglu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                 approximate: str = "none", *, backend: str = "auto") -> Tensor:
    """gelu(x @ W_a.T + b_a) * (x @ W_g.T + b_g) with weight = [W_a; W_g] (2N, K) and bias
    = [b_a; b_g] (2N,) or None; x (..., K) -> (..., N). approximate: "none" is the exact erf
    GELU, "tanh" the approximation."""
    x, weight, bias = ops._gelu_linear_operands(OP, x, weight, bias, approximate, halves=True)
    n2, k = weight.shape
    chosen = ops.resolve_backend(OP, backend, x.device, dtype=x.dtype, in_features=k,
                                 out_features=n2)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if chosen == "torch" and cpu.should_use(x2, weight, bias):
        # CPU inference: the oneDNN GEMM, then GELU and the product in place on its output
        act, gate = cpu.linear(x2, weight, bias).chunk(2, dim=-1)
        return ops.own_view(torch.nn.functional.gelu(act, approximate=approximate).mul_(gate),
                            (*lead, n2 // 2))
    x2 = x2.contiguous()
    b = bias.contiguous() if bias is not None else None
    if ops._inference(x2, weight, bias):
        out = forward_for_inference(chosen)(x2, weight.contiguous(), b, approximate)[0]
    else:
        args = (x2, weight.contiguous(), b, approximate, chosen)
        if ops._eager(x2, weight, bias):
            out = ops.eager_apply("fastbert::linear_geglu", _forward, _setup, _grad, *args)[0]
        else:
            out = _fwd(*args)[0]
    return ops.own_view(out, (*lead, n2 // 2))
