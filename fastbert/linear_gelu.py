"""`fastbert.linear_bias_gelu`: gelu(x @ weight.T + bias) with the bias and GELU in the GEMM's
epilogue, on every backend, with backward. Backend entry points: fastbert/ops.py's docstring.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from fastbert import cpu, ops


def _linear_bias_gelu_forward(x, weight, bias, approximate, store_pre, backend):
    """store_pre=False (no gradient will be asked for): pre comes back empty, (0, N)."""
    if backend == "triton":  # its GEMM epilogue skips the store
        return ops._backend_module(backend).linear_bias_gelu_forward(x, weight, bias,
                                                                     approximate, store_pre)
    out, pre = ops._backend_module(backend).linear_bias_gelu_forward(x, weight, bias, approximate)
    return out, (pre if store_pre else pre.new_empty(0, pre.shape[1]))


@torch.library.custom_op("fastbert::linear_bias_gelu_fwd", mutates_args=())
def _linear_bias_gelu_fwd(x: Tensor, weight: Tensor, bias: Tensor, approximate: str,
                          store_pre: bool, backend: str) -> Tuple[Tensor, Tensor]:
    return _linear_bias_gelu_forward(x, weight, bias, approximate, store_pre, backend)


@_linear_bias_gelu_fwd.register_fake
def _(x, weight, bias, approximate, store_pre, backend):
    m, n = x.shape[0], weight.shape[0]
    return x.new_empty(m, n), x.new_empty(m if store_pre else 0, n)


def _linear_bias_gelu_backward(dout: Tensor, x: Tensor, weight: Tensor, pre: Tensor,
                               approximate: str, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = ops._backend_module(backend).linear_bias_gelu_backward(
        dout.contiguous(), x, weight, pre, approximate)
    return dx, dw, db


_linear_bias_gelu_bwd = torch.library.custom_op("fastbert::linear_bias_gelu_bwd",
                                                mutates_args=())(_linear_bias_gelu_backward)


@_linear_bias_gelu_bwd.register_fake
def _(dout, x, weight, pre, approximate, backend):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _linear_bias_gelu_setup(ctx, inputs, output):
    x, weight, bias, approximate, store_pre, backend = inputs
    _, pre = output
    ctx.save_for_backward(x, weight, pre)
    ctx.approximate, ctx.backend = approximate, backend
    ctx.mark_non_differentiable(pre)
    ctx.set_materialize_grads(False)  # no zero-filled (M, N) gradient for the pre-activation


def _linear_bias_gelu_grad(ctx, dout, dpre):
    if dout is None:
        return (None,) * 6
    x, weight, pre = ctx.saved_tensors
    backward = ops._backward_impl(ctx, _linear_bias_gelu_bwd, _linear_bias_gelu_backward)
    dx, dw, db = backward(dout, x, weight, pre, ctx.approximate, ctx.backend)
    return dx, dw, db, None, None, None


_linear_bias_gelu_fwd.register_autograd(_linear_bias_gelu_grad,
                                        setup_context=_linear_bias_gelu_setup)


def linear_bias_gelu(x: Tensor, weight: Tensor, bias: Tensor, *, approximate: str = "none",
                     backend: str = "auto") -> Tensor:
    """gelu(x @ weight.T + bias), weight (N, K) as in nn.Linear; x (..., K) -> (..., N)."""
    op = "fastbert.linear_bias_gelu"
    x, weight, bias = ops._gelu_linear_operands(op, x, weight, bias, approximate)
    n, k = weight.shape
    chosen = ops.resolve_backend(op, backend, x.device, dtype=x.dtype, in_features=k,
                                 out_features=n)
    lead = x.shape[:-1]
    if chosen == "torch" and cpu.should_use(x.reshape(-1, k), weight, bias):
        # CPU inference: oneDNN GEMM on a prepacked weight with GELU as its post-op
        with ops._profiled("fastbert::linear_bias_gelu_fwd"):
            return ops.own_view(cpu.linear_gelu(x.reshape(-1, k), weight, bias, approximate),
                                (*lead, n))
    x2 = x.reshape(-1, k).contiguous()
    if ops._inference(x2, weight, bias):
        out, _ = _linear_bias_gelu_forward(x2, weight.contiguous(), bias.contiguous(),
                                           approximate, False, chosen)
    else:
        args = (x2, weight.contiguous(), bias.contiguous(), approximate, True, chosen)
        if ops._eager(x2, weight, bias):
            out = ops.eager_apply("fastbert::linear_bias_gelu", _linear_bias_gelu_forward,
                                  _linear_bias_gelu_setup, _linear_bias_gelu_grad, *args)[0]
        else:
            out = _linear_bias_gelu_fwd(*args)[0]
    return ops.own_view(out, (*lead, n))
