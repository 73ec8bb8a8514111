"""Triton kernels for y = LayerNorm(dropout(x) + residual): forward, backward, and their launchers.

Layout follows Triton tutorial 05 (layer norm): one program normalises one row held in registers,
statistics in fp32. Dropout is drawn in-kernel with philox, `tl.rand(seed, row * hidden + col)`, so
backward regenerates the forward's mask from the seed instead of storing it. dweight/dbias are
made deterministic by giving each backward program a fixed range of rows: it writes one fp32
partial sum per program, and a single torch reduction over the programs finishes them.
Autograd lives in fastbert/ops.py; this module only runs kernels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A whole row lives in registers; 16384 fp32 values is 64 KB per program, the tutorial's limit.
MAX_HIDDEN = 16384


@triton.jit
def _add_layer_norm_fwd_kernel(
    X, RESIDUAL, W, B, Y, MEAN, RSTD,
    hidden, eps, dropout_p, seed,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < hidden
    offsets = row * hidden + cols  # also the philox counter, shared with backward

    s = tl.load(X + offsets, mask=in_row, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(seed, offsets) >= dropout_p
        s = tl.where(keep, s / (1.0 - dropout_p), 0.0)
    if HAS_RESIDUAL:
        s += tl.load(RESIDUAL + offsets, mask=in_row, other=0.0).to(tl.float32)

    mean = tl.sum(s, axis=0) / hidden
    centered = tl.where(in_row, s - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / hidden
    rstd = 1.0 / tl.sqrt(var + eps)

    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    y = centered * rstd * w + b
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=in_row)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _add_layer_norm_bwd_kernel(
    DY, X, RESIDUAL, W, MEAN, RSTD, DX, DRESIDUAL, DW_PARTIAL, DB_PARTIAL,
    rows, hidden, rows_per_program, dropout_p, seed,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < hidden
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    row_start = pid.to(tl.int64) * rows_per_program  # int64: rows * hidden may pass 2**31
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for row in range(row_start, row_end):
        offsets = row * hidden + cols
        # Recompute the pre-norm sum (and the dropout mask) rather than storing it in forward.
        s = tl.load(X + offsets, mask=in_row, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = tl.rand(seed, offsets) >= dropout_p
            s = tl.where(keep, s / (1.0 - dropout_p), 0.0)
        if HAS_RESIDUAL:
            s += tl.load(RESIDUAL + offsets, mask=in_row, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(in_row, (s - mean) * rstd, 0.0)
        dy = tl.load(DY + offsets, mask=in_row, other=0.0).to(tl.float32)

        dw_acc += dy * xhat
        db_acc += dy
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / hidden
        c2 = tl.sum(wdy, axis=0) / hidden
        ds = (wdy - (xhat * c1 + c2)) * rstd  # gradient w.r.t. the pre-norm sum
        if HAS_RESIDUAL:
            tl.store(DRESIDUAL + offsets, ds.to(DRESIDUAL.dtype.element_ty), mask=in_row)
        if HAS_DROPOUT:
            ds = tl.where(keep, ds / (1.0 - dropout_p), 0.0)
        tl.store(DX + offsets, ds.to(DX.dtype.element_ty), mask=in_row)

    tl.store(DW_PARTIAL + pid * hidden + cols, dw_acc, mask=in_row)
    tl.store(DB_PARTIAL + pid * hidden + cols, db_acc, mask=in_row)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

def unsupported(dtype: torch.dtype, hidden: int, dropout_p: float = 0.0) -> Optional[str]:
    """Why these kernels cannot serve the input, or None."""
    if dtype not in SUPPORTED_DTYPES:
        return f"the Triton add_layer_norm supports float16, bfloat16, float32, got {dtype}"
    if not 1 <= hidden <= MAX_HIDDEN:
        return f"the Triton add_layer_norm supports hidden sizes 1..{MAX_HIDDEN}, got {hidden}"
    return None


def _row_config(hidden: int) -> Tuple[int, int]:
    """(BLOCK_N, num_warps) for one row per program: more warps for wider rows."""
    block_n = triton.next_power_of_2(hidden)
    num_warps = min(max(block_n // 256, 1), 16)
    return block_n, num_warps


def _backward_programs(rows: int, device: torch.device) -> int:
    """How many backward programs (= dweight/dbias partials). Depends only on the shape and the
    device, so the reduction order, and hence the result, is the same run after run."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: a few programs keep the partial-sum path exercised
        target = 4
    return max(1, min(rows, target))


def add_layer_norm_forward(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                           eps: float, dropout_p: float, seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    rows, hidden = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, mean, rstd
    block_n, num_warps = _row_config(hidden)
    _add_layer_norm_fwd_kernel[(rows,)](
        x, residual if residual is not None else x, weight, bias, y, mean, rstd,
        hidden, eps, dropout_p, seed,
        HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0.0, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, mean, rstd


def add_layer_norm_backward(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Tensor,
                            mean: Tensor, rstd: Tensor, dropout_p: float, seed: int
                            ) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    rows, hidden = x.shape
    dx = torch.empty_like(x)
    dresidual = torch.empty_like(residual) if residual is not None else None
    programs = _backward_programs(rows, x.device)
    dw_partial = torch.empty(programs, hidden, dtype=torch.float32, device=x.device)
    db_partial = torch.empty(programs, hidden, dtype=torch.float32, device=x.device)
    if rows == 0:
        return dx, dresidual, torch.zeros_like(weight), torch.zeros_like(weight)
    block_n, num_warps = _row_config(hidden)
    _add_layer_norm_bwd_kernel[(programs,)](
        dy, x, residual if residual is not None else x, weight, mean, rstd,
        dx, dresidual if dresidual is not None else dx, dw_partial, db_partial,
        rows, hidden, triton.cdiv(rows, programs), dropout_p, seed,
        HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0.0, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    # A fixed-shape torch reduction has a fixed order: deterministic.
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(weight.dtype)
    return dx, dresidual, dweight, dbias
