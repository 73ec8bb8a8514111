"""fastbert's own fp32 CPU add+LayerNorm, forward and backward (the extension fastbert._cpu,
csrc/cpu/layer_norm.cpp): the torch backend's `add_layer_norm` on CPU wherever it applies.

ATen's LayerNorm(dropout(x) + residual) runs the sum as a pass of its own, keeps it for the
backward, and with dropout draws a mask tensor (torch.rand), stores it and applies it in further
passes, each regenerated in the backward. This kernel makes a row's sum, statistics and output
in one visit of the row (it stays in L1), stores the sum only where the pre-norm form returns
it, and its backward recomputes the sum from x and the residual, dropout's mask included: a hash
of (seed, row, column), MurmurHash3's finaliser as fastbert.cpu_attention's, so the backward
drops what the forward dropped. Rows in blocks of 32 over torch's OpenMP team (a static
schedule); row statistics, dweight and dbias are summed in fp64 lanes, dweight and dbias per
thread, then over the threads in order (the same result on every call with the same thread
count).

    from fastbert import cpu_layer_norm
    if cpu_layer_norm.serves(x, residual, out_dtype):  # x, residual (rows, C) fp32 on CPU
        y, mean, rstd = cpu_layer_norm.add_layer_norm_forward(x, residual, weight, bias, eps,
                                                              dropout_p, seed)
        dx, dres, dweight, dbias = cpu_layer_norm.add_layer_norm_backward(
            dy, x, residual, weight, mean, rstd, dropout_p, seed)

The contract is the torch backend's (fastbert/ops.py): mean and rstd (rows,) fp32; store_sum
adds the pre-norm sum as a fourth output; dsum is the gradient reaching it. Weight and bias may
be any float dtype (read in fp32; dweight and dbias come back in weight's). fp16/bf16 and fp64
activations, views that are not contiguous, and anything under forward-mode AD or a torch.func
transform stay on ATen's kernels; so does everything when the extension is not built
(`reason()` says why), and `set_enabled(False)` switches it off. ATen's path on CPU drops by the
same hash mask (`keep_mask`; it scales kept elements by 1 / (1 - p), the kernel by 1 / its exact
keep rate, within 1e-9), so a backward that takes the other path than its forward still
matches it. No double backward (create_graph=True through it raises).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from fastbert import cpu_attention
from fastbert.cpu_attention import _SEED_BITS, _cpu, _functorch_active, _functorch_wrapped, _state

_enabled = True
_FP32 = torch.float32


def set_enabled(enabled: bool) -> None:
    """Switch the kernel on or off for this process (off: ATen's LayerNorm serves)."""
    global _enabled
    _enabled = bool(enabled)


def reason() -> Optional[str]:
    """Why the kernel cannot serve at all here, or None."""
    why = cpu_attention.extension_reason()
    if why is not None:
        return why
    if not _enabled:
        return "switched off (fastbert.cpu_layer_norm.set_enabled(False))"
    return None


def describe() -> str:
    why = reason()
    return (f"fastbert's CPU add+LayerNorm kernel ({_cpu.isa()}, fp32)" if why is None
            else f"ATen's LayerNorm ({why})")


_AVAILABLE = cpu_attention.extension_reason() is None


def masks_here(x: Tensor) -> bool:
    """Whether add_layer_norm's dropout on x draws `keep_mask`'s hash mask (a CPU tensor, the
    extension built; set_enabled does not change it)."""
    return _AVAILABLE and x.device.type == "cpu"


def serves(x: Tensor, residual: Optional[Tensor], out_dtype: Optional[torch.dtype],
           backward: bool = False) -> bool:
    """Whether the kernel takes add_layer_norm on x (rows, C) and residual (or None) with y in
    out_dtype (None: x's): plain contiguous fp32 CPU tensors (the kernel reads rows of C
    floats from their addresses). A backward asks with its forward's x and residual, and its dy's
    dtype (y's), and `backward=True`: then x must not be a functorch wrapper either (torch.func.
    vjp's backward runs after its transform has exited, on the dead wrappers of a forward that
    ran under cpu_attention.suspended()). Attribute reads and a few checks: this runs once per
    norm."""
    return (_enabled and _AVAILABLE and not _state.suspended and x.__class__ is Tensor
            and x.dtype == _FP32 and x.device.type == "cpu" and x.ndim == 2
            and (out_dtype is None or out_dtype == _FP32)
            and (residual is None or (residual.__class__ is Tensor and residual.dtype == _FP32
                                      and residual.shape == x.shape
                                      and residual.device.type == "cpu"
                                      and residual.is_contiguous()))
            and forward_ad._current_level < 0 and not _functorch_active()
            and x.is_contiguous() and not (backward and _functorch_wrapped(x)))


def keep_mask(seed: int, shape, dropout_p: float) -> Tensor:
    """The (rows, C) bool keep mask the kernel draws for `seed` (True = kept). The torch
    backend's add_layer_norm drops by it on CPU in every dtype where the extension is built
    (`masks_here`), served by the kernel or not, so a call drops the same elements whichever
    path runs it (fastbert.reference.dropout_keep_mask's torch.Generator mask elsewhere)."""
    rows, cols = shape
    if _functorch_active():  # a plain tensor (a transform's factory calls make wrappers)
        with torch._C._DisableFuncTorch():
            keep = torch.empty(rows, cols, dtype=torch.bool, device="cpu")
    else:
        keep = torch.empty(rows, cols, dtype=torch.bool, device="cpu")
    _cpu.add_layer_norm_keep_mask(keep.data_ptr(), rows, cols, dropout_p, seed & _SEED_BITS,
                                  torch.get_num_threads())
    return keep


def add_layer_norm_forward(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                           eps: float, dropout_p: float, seed: int, store_sum: bool = False,
                           out_dtype: Optional[torch.dtype] = None):
    """(y, mean, rstd), and the pre-norm sum dropout(x) + residual as a fourth output with
    store_sum, on inputs `serves` took (out_dtype None or fp32: y is fp32)."""
    w = weight.contiguous() if weight.dtype == _FP32 else weight.to(_FP32).contiguous()
    b = bias.contiguous() if bias.dtype == _FP32 else bias.to(_FP32).contiguous()
    rows, cols = x.shape
    y = torch.empty(rows, cols, dtype=_FP32, device="cpu")
    mean = torch.empty(rows, dtype=_FP32, device="cpu")
    rstd = torch.empty(rows, dtype=_FP32, device="cpu")
    s = torch.empty(rows, cols, dtype=_FP32, device="cpu") if store_sum else None
    _cpu.add_layer_norm_forward(
        x.data_ptr(), residual.data_ptr() if residual is not None else 0, w.data_ptr(),
        b.data_ptr(), y.data_ptr(), s.data_ptr() if s is not None else 0, mean.data_ptr(),
        rstd.data_ptr(), rows, cols, eps, dropout_p, seed & _SEED_BITS, torch.get_num_threads())
    return (y, mean, rstd, s) if store_sum else (y, mean, rstd)


def add_layer_norm_backward(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Tensor,
                            mean: Tensor, rstd: Tensor, dropout_p: float, seed: int,
                            dsum: Optional[Tensor] = None):
    """(dx, dresidual or None, dweight, dbias) of add_layer_norm_forward from its mean and rstd
    (the sum recomputed, dropout's mask redrawn from seed); dsum: the gradient reaching the sum
    (store_sum's output), or None. dy, x, residual and dsum contiguous (x and residual as
    `serves` took them; dy and dsum as every backend receives them)."""
    rows, cols = x.shape
    if dy.shape != x.shape or dy.dtype != _FP32 or mean.shape != (rows,) or \
            rstd.shape != (rows,) or mean.dtype != _FP32 or rstd.dtype != _FP32 or \
            (dsum is not None and (dsum.shape != x.shape or dsum.dtype != _FP32)):
        raise ValueError(f"fastbert.cpu_layer_norm.add_layer_norm_backward: expected fp32 dy and "
                         f"dsum {tuple(x.shape)} like x, mean and rstd ({rows},); got dy "
                         f"{dy.dtype} {tuple(dy.shape)}, mean {mean.dtype} {tuple(mean.shape)}, "
                         f"rstd {rstd.dtype} {tuple(rstd.shape)}")
    if torch.is_grad_enabled() and (dy.requires_grad or x.requires_grad or weight.requires_grad
                                    or (residual is not None and residual.requires_grad)
                                    or (dsum is not None and dsum.requires_grad)):
        raise NotImplementedError(
            "fastbert.cpu_layer_norm.add_layer_norm_backward: a double backward through "
            "fastbert's CPU add+LayerNorm kernel is not implemented "
            "(fastbert.cpu_layer_norm.set_enabled(False) switches it off)")
    w = weight.contiguous() if weight.dtype == _FP32 else weight.to(_FP32).contiguous()
    dx = torch.empty(rows, cols, dtype=_FP32, device="cpu")
    dres = torch.empty(rows, cols, dtype=_FP32, device="cpu") if residual is not None else None
    dweight = torch.empty(cols, dtype=_FP32, device="cpu")
    dbias = torch.empty(cols, dtype=_FP32, device="cpu")
    _cpu.add_layer_norm_backward(
        dy.data_ptr(), dsum.data_ptr() if dsum is not None else 0, x.data_ptr(),
        residual.data_ptr() if residual is not None else 0, w.data_ptr(), mean.data_ptr(),
        rstd.data_ptr(), dx.data_ptr(), dres.data_ptr() if dres is not None else 0,
        dweight.data_ptr(), dbias.data_ptr(), rows, cols, dropout_p, seed & _SEED_BITS, torch.get_num_threads())
    if weight.dtype != _FP32:
        dweight, dbias = dweight.to(weight.dtype), dbias.to(weight.dtype)
    return dx, dres, dweight, dbias
