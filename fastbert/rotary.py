"""`fastbert.apply_rotary`: rotary position embeddings with flash-attn's `apply_rotary_emb`
meaning, padded or packed (positions restart per sequence), with backward.

Backend entry point (fastbert/ops.py describes the others):

    apply_rotary(x, cos, sin, positions, interleaved, conjugate) -> out (contiguous, x.dtype)

positions (int64, broadcastable to x.shape[:-2]) is each row's index into cos/sin; conjugate
turns the other way, which is the backward (a rotation's gradient is its inverse).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fastbert import ops

OP = "fastbert.apply_rotary"


def _rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool,
            conjugate: bool, backend: str) -> Tensor:
    return ops._backend_module(backend).apply_rotary(x, cos, sin, positions, interleaved,
                                                     conjugate)


_rotary_op = torch.library.custom_op("fastbert::apply_rotary", mutates_args=())(_rotary)


@_rotary_op.register_fake
def _(x, cos, sin, positions, interleaved, conjugate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    _, cos, sin, positions, interleaved, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.interleaved, ctx.conjugate, ctx.backend = interleaved, conjugate, backend


def _grad(ctx, dout):
    cos, sin, positions = ctx.saved_tensors
    rotate = ops._backward_impl(ctx, _rotary_op, _rotary)
    dx = rotate(dout.contiguous(), cos, sin, positions, ctx.interleaved, not ctx.conjugate,
                ctx.backend)
    return dx, None, None, None, None, None, None


_rotary_op.register_autograd(_grad, setup_context=_setup)


def _positions(x: Tensor, cu_seqlens: Optional[Tensor], seqlen_offsets) -> Tensor:
    """Each row's index into cos/sin, with no host sync: (B, S) or (1, S) padded, (total,)
    packed (the position within its sequence)."""
    offsets = seqlen_offsets.long() if isinstance(seqlen_offsets, Tensor) else seqlen_offsets
    if cu_seqlens is None:
        positions = torch.arange(x.shape[1], device=x.device).view(1, -1)
        return positions + (offsets.view(-1, 1) if isinstance(offsets, Tensor) else offsets)
    tokens = torch.arange(x.shape[0], device=x.device, dtype=cu_seqlens.dtype)
    sequence = torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)
    positions = (tokens - cu_seqlens[sequence]).long()
    return positions + (offsets[sequence] if isinstance(offsets, Tensor) else offsets)


def check_tables(op: str, x_name: str, x: Tensor, cos: Tensor, sin: Tensor,
                 names=("cos", "sin")) -> None:
    """cos and sin: float tensors (S_ro, R / 2) of one shape on x's device, R <= x's head dim,
    needing no gradient; else a clear error."""
    for name, t in zip(names, (cos, sin)):
        ops._expect_tensor(op, name, t)
        ops._expect_float(op, name, t)
        ops._expect_same_device(op, x_name, x, name, t)
        if t.dim() != 2 or t.shape != cos.shape or not 1 <= 2 * t.shape[1] <= x.shape[-1]:
            raise ValueError(f"{op}: argument '{name}' expected shape (S_ro, R / 2) like "
                             f"'{names[0]}', with R <= head dim {x.shape[-1]}, got "
                             f"{tuple(t.shape)}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: argument '{name}' requires grad, but cos and sin get no "
                             f"gradient (as in flash-attn): pass them detached")


def check_offsets(op: str, name: str, seqlen_offsets, batch: int, x: Tensor,
                  x_name: str = "x") -> int:
    """seqlen_offsets: an int >= 0 or an integer (batch,) tensor on x's device. -> the smallest
    position known on the host (the int, or 0 for a tensor: not read, no sync)."""
    if isinstance(seqlen_offsets, Tensor):
        ops._expect_same_device(op, x_name, x, name, seqlen_offsets)
        if seqlen_offsets.shape != (batch,) or seqlen_offsets.is_floating_point():
            raise ValueError(f"{op}: argument '{name}' expected an int or an integer tensor "
                             f"({batch},), got {seqlen_offsets.dtype} "
                             f"{tuple(seqlen_offsets.shape)}")
        return 0
    if isinstance(seqlen_offsets, int) and not isinstance(seqlen_offsets, bool) \
            and seqlen_offsets >= 0:
        return seqlen_offsets
    raise ValueError(f"{op}: argument '{name}' expected an int >= 0 or a tensor ({batch},), "
                     f"got {seqlen_offsets!r}")


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, cu_seqlens: Optional[Tensor] = None,
                 max_seqlen: Optional[int] = None, interleaved: bool = False,
                 seqlen_offsets: Union[int, Tensor] = 0, backend: str = "auto") -> Tensor:
    """Rotary embeddings as flash-attn's apply_rotary_emb. x (B, S, H, D), or (total, H, D)
    packed with cu_seqlens (B + 1,) int32 and max_seqlen; cos and sin (S_ro, R / 2) with R <= D:
    the first R dims of each head turn by the angle of the token's position (pairs (i, i + R/2),
    or (2i, 2i + 1) when interleaved), the rest pass through. Positions start at
    seqlen_offsets (an int, or (B,) per sequence) and restart per packed sequence. Returns a new
    tensor like x; cos and sin get no gradient (as in flash-attn)."""
    ops._expect_tensor(OP, "x", x)
    ops._expect_float(OP, "x", x)
    packed = cu_seqlens is not None
    if x.dim() != (3 if packed else 4):
        layout = "(total, H, D) with cu_seqlens" if packed else "(B, S, H, D)"
        raise ValueError(f"{OP}: argument 'x' expected a {layout} tensor, got shape "
                         f"{tuple(x.shape)}")
    check_tables(OP, "x", x, cos, sin)
    batch = cu_seqlens.numel() - 1 if packed else x.shape[0]
    start = check_offsets(OP, "seqlen_offsets", seqlen_offsets, batch, x)
    if packed:
        ops._expect_tensor(OP, "cu_seqlens", cu_seqlens)
        ops._expect_same_device(OP, "x", x, "cu_seqlens", cu_seqlens)
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 1:
            raise ValueError(f"{OP}: argument 'cu_seqlens' expected an int32 (B + 1,) tensor, "
                             f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"{OP}: argument 'max_seqlen' expected a non-negative int with "
                             f"cu_seqlens, got {max_seqlen!r}")
        longest = max_seqlen
    else:
        if max_seqlen is not None:
            raise ValueError(f"{OP}: argument 'max_seqlen' goes with cu_seqlens (packed x), got "
                             f"{max_seqlen!r} for a padded x")
        longest = x.shape[1]
    if longest + start > cos.shape[0]:
        raise ValueError(f"{OP}: arguments 'cos'/'sin' expected at least {longest + start} "
                         f"positions (sequence length + seqlen_offsets), got {cos.shape[0]}")
    chosen = ops.resolve_backend(OP, backend, x.device, dtype=x.dtype, head_dim=x.shape[-1])
    positions = _positions(x, cu_seqlens.contiguous() if packed else None, seqlen_offsets)
    args = (x if x.stride(-1) == 1 else x.contiguous(), cos.contiguous(), sin.contiguous(),
            positions, bool(interleaved), False, chosen)
    if ops._inference(x):
        return _rotary(*args)
    if ops._eager(x, cos, sin):
        return ops.eager_apply("fastbert::apply_rotary", _rotary, _setup, _grad, *args)
    return _rotary_op(*args)
