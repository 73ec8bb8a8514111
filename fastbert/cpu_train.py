"""CPU training GEMMs through oneDNN: x @ weight.T + bias with autograd, forward and backward.

A training step records autograd, so fastbert/cpu.py's inference route does not serve it and
`F.linear` runs its three GEMMs (forward, dx, dweight) on ATen's BLAS: MKL in torch's CPU builds,
which on AMD CPUs runs at about half oneDNN's rate on the same cores (2,679 x 768 x 2,304, Zen 5,
2 threads: forward 213 against 412 GFLOP/s, dx 214 against 395, dweight 223 against 357, the
transposed operands passed to oneDNN as strided views, no copies). This module gives autograd
the oneDNN GEMMs for plain fp32 CPU tensors with at least MIN_ROWS rows, on the weights as they
are (nothing is cached):

    y = cpu_train.linear_nd(x, weight, bias)      # F.linear, differentiable, x (..., K)
    pre = cpu_train.gemm(x, weight, bias)         # no autograd: inside a fused op's forward
    dx, dweight, dbias = cpu_train.linear_backward(dy, x, weight)   # and in its backward

A double backward (create_graph=True) takes F.linear's differentiable formulas. The oneDNN ops
are checked once against fp64 before first use, and any failure sends every later call to the
public path, as in fastbert/cpu.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastbert import cpu, reference

# Rows from which the route is taken. At BERT-base's widths it pays from the smallest batches (one
# 768 x 768 linear, forward + backward, 16 / 128 / 512 rows: 1.6x / 2.1x / 2.1x F.linear; 768 x
# 3,072: 2.2x / 1.6x / 2.0x, Zen 5, 2 threads); the bound keeps small inputs, whose GEMMs cost
# microseconds either way, on F.linear's cheaper dispatch (no autograd.Function in Python).
MIN_ROWS = 128

_state: dict = {}  # "reason": None when the route works here, else why not (probed once)


# dweight sums over the rows: one oneDNN GEMM over thousands of them rounded 3x worse than MKL's
# (max error against fp64, 2,679-4,096 rows), past the tolerance rule; blocks of DWEIGHT_BLOCK
# rows, each added onto the sum by the GEMM itself (a oneDNN binary post-op), came to 1.0-1.33x
# MKL's error at the same speed as one GEMM
DWEIGHT_BLOCK = 256


def _gemm_nt(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """a @ b.T (+ bias) by oneDNN's inner product; a and b may be strided views."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def _dweight(dy: Tensor, x: Tensor, block: int) -> Tensor:
    """dy.T @ x (N, K) for dy (rows, N), x (rows, K), in row blocks summed in fp32."""
    total = None
    for start in range(0, dy.shape[0], block):
        a, b = dy[start:start + block].t(), x[start:start + block].t()
        total = _gemm_nt(a, b) if total is None else \
            torch.ops.mkldnn._linear_pointwise.binary(a, total, b, None, "add")
    return total


def _probe() -> Optional[str]:
    """The forward and both backward GEMMs on strided operands, against fp64."""
    reason = cpu._private_ops_reason()
    if reason is not None:
        return reason
    g = torch.Generator().manual_seed(0)
    # explicit dtype and device: the first call may come under set_default_dtype or torch.device
    x, w, dy, b = (torch.randn(*shape, generator=g, dtype=torch.float32, device="cpu")
                   for shape in ((37, 24), (40, 24), (37, 40), (40,)))
    try:
        got = (_gemm_nt(x, w, b), _gemm_nt(dy, w.t()), _dweight(dy, x, 16))
    except Exception as e:  # any failure means: do not use the route here
        return f"torch.ops.mkldnn._linear_pointwise failed: {type(e).__name__}: {e}"
    xd, wd, dyd = x.double(), w.double(), dy.double()
    exact = (xd @ wd.t() + b.double(), dyd @ wd, dyd.t() @ xd)
    err = max((a.double() - e).abs().max().item() for a, e in zip(got, exact))
    if not err <= 1e-4:
        return f"torch.ops.mkldnn._linear_pointwise disagrees with fp64 (max error {err:.2e})"
    return None


def reason() -> Optional[str]:
    """Why the oneDNN training route is not used here, or None (torch.backends.mkldnn's switch
    read per call, the ops probed once)."""
    why = cpu._private_ops_reason()
    if why is not None:
        return why
    if "reason" not in _state:
        _state["reason"] = _probe()
    return _state["reason"]


def describe() -> str:
    """One line: which GEMMs CPU training runs and why."""
    if not cpu.is_enabled():
        return ("CPU training GEMMs: F.linear; the oneDNN path is switched off "
                "(fastbert.cpu.set_enabled)")
    why = reason()
    if why is not None:
        return f"CPU training GEMMs: F.linear, because {why}"
    return (f"CPU training GEMMs (fp32, from {MIN_ROWS} rows): oneDNN inner product, forward, dx "
            f"and dweight")


def _failed(error: Exception) -> None:
    _state["reason"] = (f"torch.ops.mkldnn._linear_pointwise failed at run time: "
                        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def route_open(device: torch.device, dtype: torch.dtype, rows: int) -> bool:
    """Whether `rows` token rows in `dtype` on `device` take the route: should_use's checks that
    do not depend on the tensors' layout (the lean plans pre-check the rows themselves)."""
    return (device.type == "cpu" and dtype == torch.float32 and rows >= MIN_ROWS
            and cpu.is_enabled() and not cpu._compiling() and not cpu._autocast_on()
            and not torch._C._are_functorch_transforms_active()
            and _get_current_dispatch_mode() is None  # e.g. FlopCounterMode counts aten's GEMMs
            and forward_ad._current_level < 0  # forward-mode AD: _Linear has no jvp
            and reason() is None)


def _operand_ok(t: Tensor) -> bool:
    """A plain (or Parameter) 2-D contiguous fp32 CPU tensor."""
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.dim() == 2
            and t.dtype == torch.float32 and t.device.type == "cpu" and t.layout == torch.strided
            and t.is_contiguous())


def _gemm_ok(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Plain contiguous fp32 CPU tensors, x (rows >= MIN_ROWS, K), weight (N, K), bias (N,), with
    the route open."""
    if type(x) is not torch.Tensor or not (_operand_ok(x) and _operand_ok(weight)) \
            or x.shape[1] != weight.shape[1] or 0 in weight.shape:
        return False  # (tensor subclasses keep their own dispatch; oneDNN builds no primitive
        # for an empty weight)
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"
                             or bias.shape != weight.shape[:1]):
        return False
    return route_open(x.device, x.dtype, x.shape[0])


def should_use(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether `linear` serves F.linear(x, weight, bias): plain contiguous fp32 CPU tensors, x
    (rows >= MIN_ROWS, K), where autograd is recorded (grad mode on and something requires
    grad), outside torch.compile tracing, functorch transforms and CPU autocast."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        return False
    return _gemm_ok(x, weight, bias)


def linear_nd(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, weight, bias) for x (..., K), by `linear` where should_use serves it."""
    if x.dim() < 2 or x.shape[-1] == 0:
        return F.linear(x, weight, bias)  # which says what is wrong, or serves it
    x2 = x.reshape(-1, x.shape[-1])
    if should_use(x2, weight, bias):
        return linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x @ weight.T + bias with no autograd (inside a fused op's forward), by oneDNN where the
    route serves these tensors, else F.linear."""
    if _gemm_ok(x, weight, bias):
        try:
            return _gemm_nt(x, weight, bias)
        except Exception as e:
            _failed(e)
    return F.linear(x, weight, bias)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        # as F.linear: x kept only for dweight, the weight only for dx
        dx, dweight = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if dweight else None, weight if dx else None)
        ctx.has_bias = bias is not None
        try:
            return _gemm_nt(x, weight, bias)
        except Exception as e:  # remember, and take the public path from now on
            _failed(e)
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dweight, dbias = linear_backward(dy, x, weight, ctx.needs_input_grad)
        return dx, dweight, dbias if ctx.has_bias else None


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x @ weight.T + bias for x (rows, K) with autograd; callers check should_use first."""
    return _Linear.apply(x, weight, bias)


def linear_backward(dy: Tensor, x: Optional[Tensor], weight: Optional[Tensor],
                    needs: Tuple[bool, ...] = (True, True, True)
                    ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dweight, dbias) of x @ weight.T + bias for dy (rows, N), x (rows, K), weight (N, K);
    needs: which of the three to compute (x may be None where dweight is not needed, weight where
    dx is not). oneDNN for 2-D fp32 CPU operands with the route open, else F.linear's formulas
    (reference.linear_backward), as under create_graph."""
    if torch.is_grad_enabled() or type(dy) is not torch.Tensor or dy.dim() != 2 \
            or dy.dtype != torch.float32 or dy.device.type != "cpu" or dy.layout != torch.strided \
            or not all(_operand_ok(t) for t in (x, weight) if t is not None) \
            or not route_open(dy.device, dy.dtype, dy.shape[0]):
        if x is not None and weight is not None:
            dx, dweight, dbias = reference.linear_backward(dy, x, weight)
        else:  # _Linear's, 2-D fp32
            dx = torch.matmul(dy, weight) if needs[0] else None
            dweight = torch.matmul(dy.t(), x) if needs[1] else None
            dbias = dy.sum(0)
        return (dx if needs[0] else None, dweight if needs[1] else None,
                dbias if needs[2] else None)
    dy = dy.contiguous()  # autograd may hand an expanded or transposed gradient
    try:
        dx = _gemm_nt(dy, weight.t()) if needs[0] else None  # (rows, K)
        dweight = _dweight(dy, x, DWEIGHT_BLOCK) if needs[1] else None  # (N, K)
    except Exception as e:
        _failed(e)
        return linear_backward(dy, x, weight, needs)
    return dx, dweight, dy.sum(0) if needs[2] else None
