"""`fastbert.add_layer_norm`: LayerNorm(dropout(x) + residual) over the last dim, and its pre-norm
form (return_residual), on every backend, with backward; and the dtype it computes in under
autocast (norm_dtype). Backend entry points: fastbert/ops.py's docstring.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastbert import ops

_HALF = (torch.float16, torch.bfloat16)


def norm_dtype(device_type: str, *dtypes: torch.dtype) -> torch.dtype:
    """The dtype add_layer_norm computes in under autocast, for inputs of `dtypes`, as torch
    computes LayerNorm(x + residual) there: CUDA autocast runs layer_norm in fp32, CPU autocast
    in its input's dtype, the sum's (the wider of x and residual). So a residual stream stays
    fp32 as in the model the op replaces; the GEMM reading the output casts it down anyway."""
    wide = functools.reduce(torch.promote_types, dtypes)
    return wide if device_type == "cpu" or wide not in _HALF else torch.float32


def norm_out_dtype(x: Tensor, residual: Optional[Tensor]) -> Optional[torch.dtype]:
    """norm_dtype for these inputs (under autocast), None where it is x's own: the out_dtype the
    add_layer_norm kernels take beside x and residual as they are."""
    dtype = norm_dtype(x.device.type, x.dtype, *([residual.dtype] if residual is not None
                                                  else []))
    return None if dtype == x.dtype else dtype


def _add_layer_norm_forward(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                            eps: float, dropout_p: float, seed: Optional[Tensor], backend: str,
                            out_dtype: Optional[torch.dtype] = None
                            ) -> Tuple[Tensor, Tensor, Tensor]:
    """out_dtype: y's dtype when it is not x's (under autocast, norm_dtype; x and residual
    may then differ in dtype, and the kernels read both as they are)."""
    y, mean, rstd = ops._backend_module(backend).add_layer_norm_forward(
        x, residual, weight, bias, eps, dropout_p, ops._seed_int(seed), out_dtype=out_dtype)
    return y, mean, rstd


_add_layer_norm_fwd = torch.library.custom_op("fastbert::add_layer_norm_fwd",
                                              mutates_args=())(_add_layer_norm_forward)


@_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed, backend, out_dtype=None):
    rows = x.shape[0]
    return (torch.empty_like(x, dtype=out_dtype), x.new_empty(rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32))


def _add_layer_norm_backward(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Tensor,
                             mean: Tensor, rstd: Tensor, dropout_p: float, seed: Optional[Tensor],
                             backend: str, dsum: Optional[Tensor] = None
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """dsum: the gradient reaching the pre-norm sum as an output (return_residual), or None."""
    dx, dres, dw, db = ops._backend_module(backend).add_layer_norm_backward(
        dy.contiguous(), x, residual, weight, mean, rstd, dropout_p, ops._seed_int(seed),
        dsum=dsum.contiguous() if dsum is not None else None)
    # custom ops cannot return None; an empty tensor stands for "no residual"
    return dx, (dres if dres is not None else x.new_empty(0)), dw, db


_add_layer_norm_bwd = torch.library.custom_op("fastbert::add_layer_norm_bwd",
                                              mutates_args=())(_add_layer_norm_backward)


@_add_layer_norm_bwd.register_fake
def _(dy, x, residual, weight, mean, rstd, dropout_p, seed, backend, dsum=None):
    dres = torch.empty_like(residual) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), dres, torch.empty_like(weight), torch.empty_like(weight)


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, seed, backend, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd, seed)
    ctx.dropout_p, ctx.backend = dropout_p, backend
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for mean and rstd


def _add_layer_norm_grad(ctx, dy, dmean, drstd):
    if dy is None:
        return (None,) * 9
    x, residual, weight, mean, rstd, seed = ctx.saved_tensors
    backward = ops._backward_impl(ctx, _add_layer_norm_bwd, _add_layer_norm_backward)
    dx, dres, dw, db = backward(dy, x, residual, weight, mean, rstd, ctx.dropout_p, seed,
                                ctx.backend)
    return dx, (dres if residual is not None else None), dw, db, None, None, None, None, None


_add_layer_norm_fwd.register_autograd(_add_layer_norm_grad, setup_context=_add_layer_norm_setup)


# The pre-norm form (return_residual): the same kernels, which also store the pre-norm sum
# s = dropout(x) + residual; its gradient joins the one through the norm in the same backward.

def _add_layer_norm_residual_forward(x: Tensor, residual: Optional[Tensor], weight: Tensor,
                                     bias: Tensor, eps: float, dropout_p: float,
                                     seed: Optional[Tensor], backend: str,
                                     out_dtype: Optional[torch.dtype] = None
                                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mean, rstd, s = ops._backend_module(backend).add_layer_norm_forward(
        x, residual, weight, bias, eps, dropout_p, ops._seed_int(seed), store_sum=True,
        out_dtype=out_dtype)
    return y, s, mean, rstd


_add_layer_norm_residual_fwd = torch.library.custom_op(
    "fastbert::add_layer_norm_residual_fwd", mutates_args=())(_add_layer_norm_residual_forward)


@_add_layer_norm_residual_fwd.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed, backend, out_dtype=None):
    rows = x.shape[0]
    return (torch.empty_like(x, dtype=out_dtype), torch.empty_like(x, dtype=out_dtype),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


def _add_layer_norm_residual_setup(ctx, inputs, output):
    y, _, mean, rstd = output
    _add_layer_norm_setup(ctx, inputs, (y, mean, rstd))


def _add_layer_norm_residual_grad(ctx, dy, dsum, dmean, drstd):
    if dy is None and dsum is None:
        return (None,) * 9
    if dy is None:  # only the sum is used: nothing flows through the norm
        dy = torch.zeros_like(dsum)
    x, residual, weight, mean, rstd, seed = ctx.saved_tensors
    backward = ops._backward_impl(ctx, _add_layer_norm_bwd, _add_layer_norm_backward)
    dx, dres, dw, db = backward(dy, x, residual, weight, mean, rstd, ctx.dropout_p, seed,
                                ctx.backend, dsum)
    return dx, (dres if residual is not None else None), dw, db, None, None, None, None, None


_add_layer_norm_residual_fwd.register_autograd(_add_layer_norm_residual_grad,
                                               setup_context=_add_layer_norm_residual_setup)


def add_layer_norm(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                   eps: float = 1e-12, *, dropout_p: float = 0.0, return_residual: bool = False,
                   backend: str = "auto"):
    """LayerNorm(dropout(x) + residual) over the last dim, statistics in fp32; bias may be None
    (nn.LayerNorm(bias=False)). Under autocast it runs in the dtype torch's add and layer_norm
    would (norm_dtype): fp32 on CUDA, the wider of x and residual on CPU.

    return_residual=True: the pre-norm form, (y, s) with s = dropout(x) + residual in y's dtype,
    the next pre-norm layer's residual, from the same pass on every backend (gradients reaching
    s and y are summed in one backward)."""
    op = "fastbert.add_layer_norm"
    ops._expect_tensor(op, "x", x)
    ops._expect_float(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: argument 'x' expected at least 1 dim with a non-empty last dim, "
                         f"got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    cast = ops._autocast_dtype(x.device)
    if residual is not None:
        ops._expect_tensor(op, "residual", residual)
        ops._expect_float(op, "residual", residual)
        ops._expect_same_device(op, "x", x, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: argument 'residual' expected shape {tuple(x.shape)} like 'x', "
                             f"got {tuple(residual.shape)}")
        if cast is None and residual.dtype != x.dtype:
            raise TypeError(f"{op}: argument 'residual' expected dtype {x.dtype} like 'x', got "
                            f"{residual.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        ops._expect_tensor(op, name, t)
        ops._expect_float(op, name, t)
        ops._expect_same_device(op, "x", x, name, t)
        if tuple(t.shape) != (hidden,):
            raise ValueError(f"{op}: argument '{name}' expected shape ({hidden},) matching the "
                             f"last dim of 'x', got {tuple(t.shape)}")
    if bias is None:  # every backend's kernels take a bias: a zero one adds nothing
        bias = torch.zeros_like(weight)
    if bias.dtype != weight.dtype:
        raise TypeError(f"{op}: argument 'bias' expected dtype {weight.dtype} like 'weight', got "
                        f"{bias.dtype}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{op}: argument 'eps' expected a positive float, got {eps!r}")
    dropout_p = ops._expect_dropout(op, dropout_p)
    # under autocast, the dtype torch's LayerNorm(x + residual) would give (norm_dtype); the
    # kernels read x and residual as they are and compute in fp32 (no cast pass)
    out_dtype = norm_out_dtype(x, residual) if cast is not None else None
    if not isinstance(return_residual, bool):
        raise TypeError(f"{op}: argument 'return_residual' expected a bool, got "
                        f"{type(return_residual).__name__}")
    store = dict(store_sum=True) if return_residual else {}
    chosen = ops.resolve_backend(op, backend, x.device, dtype=out_dtype or x.dtype, hidden=hidden,
                             dropout_p=dropout_p, **store)
    shape = x.shape
    x2 = x.reshape(-1, hidden).contiguous()
    r2 = residual.reshape(-1, hidden).contiguous() if residual is not None else None
    if return_residual:
        return _add_layer_norm_residual(x2, r2, weight, bias, eps, dropout_p, chosen, shape,
                                        out_dtype)
    if ops._inference(x2, r2, weight, bias):
        y = ops._backend_module(chosen).add_layer_norm_forward(
            x2, r2, weight.contiguous(), bias.contiguous(), float(eps), dropout_p,
            ops._seed_int(ops._draw_seed(dropout_p)), out_dtype=out_dtype)[0]
    else:
        args = (x2, r2, weight.contiguous(), bias.contiguous(), float(eps), dropout_p,
                ops._draw_seed(dropout_p), chosen, out_dtype)
        if ops._eager(x2, r2, weight, bias):
            y = ops.eager_apply("fastbert::add_layer_norm", _add_layer_norm_forward,
                                _add_layer_norm_setup, _add_layer_norm_grad, *args)[0]
        else:
            y = _add_layer_norm_fwd(*args)[0]
    return ops.own_view(y, shape)


def _add_layer_norm_residual(x2, r2, weight, bias, eps, dropout_p, chosen, shape, out_dtype):
    """add_layer_norm(..., return_residual=True) on checked (rows, C) inputs: (y, s)."""
    if ops._inference(x2, r2, weight, bias):
        y, _, _, s = ops._backend_module(chosen).add_layer_norm_forward(
            x2, r2, weight.contiguous(), bias.contiguous(), float(eps), dropout_p,
            ops._seed_int(ops._draw_seed(dropout_p)), store_sum=True, out_dtype=out_dtype)
    else:
        args = (x2, r2, weight.contiguous(), bias.contiguous(), float(eps), dropout_p,
                ops._draw_seed(dropout_p), chosen, out_dtype)
        if ops._eager(x2, r2, weight, bias):
            y, s = ops.eager_apply("fastbert::add_layer_norm_residual",
                                   _add_layer_norm_residual_forward,
                                   _add_layer_norm_residual_setup, _add_layer_norm_residual_grad,
                                   *args)[:2]
        else:
            y, s = _add_layer_norm_residual_fwd(*args)[:2]
    return ops.own_view(y, shape), ops.own_view(s, shape)
