"""Rotary embeddings in Triton (fastbert.apply_rotary's backend entry point): one program per
row (token) and block of heads; the row's cos/sin are loaded once and turn every head.

    out = apply_rotary(x, cos, sin, positions, interleaved, conjugate)

x (..., H, D) with unit last stride (q and k may be strided views of a packed projection),
positions (int64) broadcastable to x.shape[:-2]: each row's index into cos and sin (S_ro, R / 2).
The first R dims of each head turn (pairs (i, i + R/2), or (2i, 2i + 1) interleaved), fp32 math;
the rest are copied. conjugate turns the other way (the backward).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastbert.triton.attention import on_device
from fastbert.triton.launch import launch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEADS_PER_PROGRAM = 4


@triton.jit
def _rotary_kernel(X, Cos, Sin, Pos, Out, stride_xr, stride_xh, stride_or, stride_oh,
                   stride_cos, n_heads, head_dim, half,
                   INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_f = tl.arange(0, BLOCK_HALF)  # frequency index
    f_ok = offs_f < half
    pos = tl.load(Pos + row)
    c = tl.load(Cos + pos * stride_cos + offs_f, mask=f_ok, other=1.0).to(tl.float32)[None, :]
    s = tl.load(Sin + pos * stride_cos + offs_f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    if CONJUGATE:
        s = -s
    if INTERLEAVED:
        first, second = 2 * offs_f, 2 * offs_f + 1
    else:
        first, second = offs_f, offs_f + half
    x_row = X + row * stride_xr + offs_h[:, None] * stride_xh
    o_row = Out + row * stride_or + offs_h[:, None] * stride_oh
    turn = (offs_h < n_heads)[:, None] & f_ok[None, :]
    x1 = tl.load(x_row + first[None, :], mask=turn, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + second[None, :], mask=turn, other=0.0).to(tl.float32)
    tl.store(o_row + first[None, :], (x1 * c - x2 * s).to(Out.dtype.element_ty), mask=turn)
    tl.store(o_row + second[None, :], (x1 * s + x2 * c).to(Out.dtype.element_ty), mask=turn)
    # the dims past the rotary ones pass through
    offs_d = 2 * half + tl.arange(0, BLOCK_D)
    rest = (offs_h < n_heads)[:, None] & (offs_d < head_dim)[None, :]
    tl.store(o_row + offs_d[None, :], tl.load(x_row + offs_d[None, :], mask=rest), mask=rest)


def unsupported(dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why this kernel cannot serve the input, or None."""
    if dtype not in SUPPORTED_DTYPES:
        return f"the Triton rotary kernel takes float16, bfloat16, float32, got {dtype}"
    return None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool, conjugate: bool) -> torch.Tensor:
    """-> out, contiguous, x's shape and dtype."""
    h, d = x.shape[-2], x.shape[-1]
    rows = x.reshape(-1, h, d)  # a view for q/k slices of a packed projection
    pos = positions.expand(x.shape[:-2]).reshape(-1).contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    half = cos.shape[-1]
    if rows.shape[0] > 0 and h > 0:
        with on_device(x.device):
            launch(_rotary_kernel, (rows.shape[0], triton.cdiv(h, HEADS_PER_PROGRAM)),
                rows, cos, sin, pos, out, rows.stride(0), rows.stride(1), out.stride(0),
                out.stride(1), cos.stride(0), h, d, half,
                INTERLEAVED=bool(interleaved), CONJUGATE=bool(conjugate),
                BLOCK_H=HEADS_PER_PROGRAM,
                BLOCK_HALF=triton.next_power_of_2(max(half, 1)),
                BLOCK_D=triton.next_power_of_2(max(d - 2 * half, 1)))
    return out.view(x.shape)
