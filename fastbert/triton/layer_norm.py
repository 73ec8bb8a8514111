"""Triton kernels for y = LayerNorm(dropout(x) + residual): forward, backward, and their launchers.

Layout follows Triton tutorial 05 (layer norm): one program normalises one row, statistics in fp32.
Rows up to MAX_BLOCK_N columns are held whole in registers (WHOLE_ROW); wider ones are walked in
MAX_BLOCK_N-column chunks, twice (statistics, then output), because holding them whole spills
registers at 16 warps. Dropout is drawn in-kernel with philox, one `randint4x` per 8 columns
(16-bit draws), keyed by the seed and counter row * ceil(hidden / 8) + column // 8, so backward
regenerates the forward's mask from the seed instead of storing it. dweight/dbias are made deterministic by giving
each backward program a fixed range of rows: it writes one fp32 partial sum per program, and a
single torch reduction over the programs finishes them.
The pre-norm form (add_layer_norm's return_residual) stores the sum dropout(x) + residual the
forward computes anyway (STORE_SUM), and its backward adds the gradient arriving at that sum
(HAS_DSUM) to the one through the norm: a pre-norm layer's residual add costs no pass of its own.
Autograd lives in fastbert/layer_norm.py; this module only runs kernels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastbert.triton.launch import launch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HIDDEN = 16384
# The widest row held whole in registers: at 8192 columns (16 warps, 16 fp32 values per array a
# thread) the backward spills on sm_90, at 16384 both kernels spill 216-1064 B (ptxas, triton 3.9).
MAX_BLOCK_N = 4096


@triton.jit
def _keep_mask(seed, row, start, hidden, dropout_p, BLOCK_N: tl.constexpr):
    """Dropout keep-mask of columns start + [0, BLOCK_N) of `row` (start a multiple of 8): one
    philox call (7 rounds, as FlashAttention's) gives 4 words, split into the 16-bit draws of 8
    consecutive columns (column 8 * g + i takes the low, then high, half of word i // 2); a
    column is kept when its draw is >= dropout_p * 2**16 (probability 1 - dropout_p within
    2**-16), compared as integers."""
    groups = start // 8 + tl.arange(0, BLOCK_N // 8)
    r0, r1, r2, r3 = tl.randint4x(seed, row * ((hidden + 7) // 8) + groups, 7)
    threshold = tl.cast(dropout_p * 65536.0, tl.uint32)
    words = tl.join(tl.join(tl.join(r0 & 0xFFFF, r2 & 0xFFFF), tl.join(r1 & 0xFFFF, r3 & 0xFFFF)),
                    tl.join(tl.join(r0 >> 16, r2 >> 16), tl.join(r1 >> 16, r3 >> 16)))
    return tl.reshape(words, (BLOCK_N,)) >= threshold


@triton.jit
def _pre_norm_sum(X, RESIDUAL, row, start, hidden, dropout_p, seed,
                  HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr):
    """dropout(x) + residual in fp32 over columns start + [0, BLOCK_N) of `row`, 0 past the row's
    end; and the dropout keep-mask (the in-row mask without dropout)."""
    cols = start + tl.arange(0, BLOCK_N)
    in_row = cols < hidden
    offsets = row * hidden + cols
    s = tl.load(X + offsets, mask=in_row, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, row, start, hidden, dropout_p, BLOCK_N)
        s = tl.where(keep, s * (1.0 / (1.0 - dropout_p)), 0.0)
    else:
        keep = in_row
    if HAS_RESIDUAL:
        s += tl.load(RESIDUAL + offsets, mask=in_row, other=0.0).to(tl.float32)
    return s, keep


@triton.jit
def _add_layer_norm_fwd_kernel(
    X, RESIDUAL, W, B, Y, MEAN, RSTD, SUM,
    hidden, eps, dropout_p, seed,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
    WHOLE_ROW: tl.constexpr, STORE_SUM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_N)
    if WHOLE_ROW:
        in_row = cols0 < hidden
        s, _ = _pre_norm_sum(X, RESIDUAL, row, 0, hidden, dropout_p, seed,
                             HAS_RESIDUAL, HAS_DROPOUT, BLOCK_N)
        if STORE_SUM:
            tl.store(SUM + row * hidden + cols0, s.to(SUM.dtype.element_ty), mask=in_row)
        # one division, and rsqrt (2**-22 relative) rather than a division by sqrt: per-row
        # scalars, but each IEEE division or sqrt is ~10 instructions of a memory-bound kernel
        inv_hidden = 1.0 / hidden
        mean = tl.sum(s, axis=0) * inv_hidden
        centered = tl.where(in_row, s - mean, 0.0)
        rstd = tl.math.rsqrt(tl.sum(centered * centered, axis=0) * inv_hidden + eps)
        w = tl.load(W + cols0, mask=in_row, other=0.0).to(tl.float32)
        b = tl.load(B + cols0, mask=in_row, other=0.0).to(tl.float32)
        tl.store(Y + row * hidden + cols0, (centered * rstd * w + b).to(Y.dtype.element_ty),
                 mask=in_row)
    else:
        # Mean and squared deviations chunk by chunk, merged as Chan et al.'s parallel variance
        # (as stable as the two-pass formula; sum and sum of squares would cancel).
        mean = 0.0
        m2 = 0.0
        for start in range(0, hidden, BLOCK_N):
            s, _ = _pre_norm_sum(X, RESIDUAL, row, start, hidden, dropout_p, seed,
                                 HAS_RESIDUAL, HAS_DROPOUT, BLOCK_N)
            if STORE_SUM:  # the first walk stores it; the second reads x and residual again
                tl.store(SUM + row * hidden + start + cols0, s.to(SUM.dtype.element_ty),
                         mask=start + cols0 < hidden)
            n = tl.minimum(hidden - start, BLOCK_N).to(tl.float32)
            chunk_mean = tl.sum(s, axis=0) / n
            deviation = tl.where(start + cols0 < hidden, s - chunk_mean, 0.0)
            delta = chunk_mean - mean
            mean += delta * (n / (start + n))
            m2 += tl.sum(deviation * deviation, axis=0) + delta * delta * (start * n / (start + n))
        rstd = tl.math.rsqrt(m2 / hidden + eps)
        for start in range(0, hidden, BLOCK_N):
            cols = start + cols0
            in_row = cols < hidden
            s, _ = _pre_norm_sum(X, RESIDUAL, row, start, hidden, dropout_p, seed,
                                 HAS_RESIDUAL, HAS_DROPOUT, BLOCK_N)
            w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
            b = tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
            tl.store(Y + row * hidden + cols, ((s - mean) * rstd * w + b).to(Y.dtype.element_ty),
                     mask=in_row)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _store_input_grads(DX, DRESIDUAL, DSUM, offsets, in_row, xhat, wdy, keep, rstd, c1, c2,
                       dropout_p, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       HAS_DSUM: tl.constexpr):
    """dresidual and dx at `offsets`, given the row's c1 = mean(xhat * w * dy), c2 = mean(w * dy);
    with HAS_DSUM, plus the gradient reaching the pre-norm sum as an output."""
    ds = (wdy - (xhat * c1 + c2)) * rstd  # gradient w.r.t. the pre-norm sum
    if HAS_DSUM:
        ds += tl.load(DSUM + offsets, mask=in_row, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        tl.store(DRESIDUAL + offsets, ds.to(DRESIDUAL.dtype.element_ty), mask=in_row)
    if HAS_DROPOUT:
        ds = tl.where(keep, ds * (1.0 / (1.0 - dropout_p)), 0.0)
    tl.store(DX + offsets, ds.to(DX.dtype.element_ty), mask=in_row)


@triton.jit
def _add_layer_norm_bwd_kernel(
    DY, X, RESIDUAL, W, MEAN, RSTD, DX, DRESIDUAL, DW_PARTIAL, DB_PARTIAL, DSUM,
    rows, hidden, rows_per_program, dropout_p, seed,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
    WHOLE_ROW: tl.constexpr, HAS_DSUM: tl.constexpr,
):
    """WHOLE_ROW: dweight/dbias sums stay in registers and are stored at the end; else each row's
    chunks are added into this program's partial rows (zeroed by the launcher)."""
    pid = tl.program_id(0)
    cols0 = tl.arange(0, BLOCK_N)
    partial = pid * hidden + cols0
    if WHOLE_ROW:
        in_row = cols0 < hidden
        w = tl.load(W + cols0, mask=in_row, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    inv_hidden = 1.0 / hidden
    row_start = pid.to(tl.int64) * rows_per_program  # int64: rows * hidden may pass 2**31
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for row in range(row_start, row_end):
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        # Recompute the pre-norm sum (and the dropout mask) rather than storing it in forward.
        if WHOLE_ROW:
            offsets = row * hidden + cols0
            s, keep = _pre_norm_sum(X, RESIDUAL, row, 0, hidden, dropout_p, seed,
                                    HAS_RESIDUAL, HAS_DROPOUT, BLOCK_N)
            xhat = tl.where(in_row, (s - mean) * rstd, 0.0)
            dy = tl.load(DY + offsets, mask=in_row, other=0.0).to(tl.float32)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) * inv_hidden
            c2 = tl.sum(wdy, axis=0) * inv_hidden
            _store_input_grads(DX, DRESIDUAL, DSUM, offsets, in_row, xhat, wdy, keep, rstd, c1,
                               c2, dropout_p, HAS_RESIDUAL, HAS_DROPOUT, HAS_DSUM)
            dw_acc += dy * xhat
            db_acc += dy
        else:  # two walks over the row's chunks: its sums c1, c2, then the gradients
            c1 = 0.0
            c2 = 0.0
            for start in range(0, hidden, BLOCK_N):
                cols = start + cols0
                in_row = cols < hidden
                s, _ = _pre_norm_sum(X, RESIDUAL, row, start, hidden, dropout_p, seed,
                                     HAS_RESIDUAL, HAS_DROPOUT, BLOCK_N)
                xhat = tl.where(in_row, (s - mean) * rstd, 0.0)
                wdy = (tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
                       * tl.load(DY + row * hidden + cols, mask=in_row, other=0.0).to(tl.float32))
                c1 += tl.sum(xhat * wdy, axis=0)
                c2 += tl.sum(wdy, axis=0)
            c1 = c1 * inv_hidden
            c2 = c2 * inv_hidden
            for start in range(0, hidden, BLOCK_N):
                cols = start + cols0
                in_row = cols < hidden
                offsets = row * hidden + cols
                s, keep = _pre_norm_sum(X, RESIDUAL, row, start, hidden, dropout_p, seed,
                                        HAS_RESIDUAL, HAS_DROPOUT, BLOCK_N)
                xhat = tl.where(in_row, (s - mean) * rstd, 0.0)
                dy = tl.load(DY + offsets, mask=in_row, other=0.0).to(tl.float32)
                wdy = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32) * dy
                _store_input_grads(DX, DRESIDUAL, DSUM, offsets, in_row, xhat, wdy, keep, rstd,
                                   c1, c2, dropout_p, HAS_RESIDUAL, HAS_DROPOUT, HAS_DSUM)
                dw = DW_PARTIAL + partial + start
                db = DB_PARTIAL + partial + start
                tl.store(dw, tl.load(dw, mask=in_row) + dy * xhat, mask=in_row)
                tl.store(db, tl.load(db, mask=in_row) + dy, mask=in_row)

    if WHOLE_ROW:
        tl.store(DW_PARTIAL + partial, dw_acc, mask=in_row)
        tl.store(DB_PARTIAL + partial, db_acc, mask=in_row)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

def unsupported(dtype: torch.dtype, hidden: int, dropout_p: float = 0.0,
                store_sum: bool = False) -> Optional[str]:
    """Why these kernels cannot serve the input, or None (the pre-norm form, store_sum,
    serves whatever the plain one does)."""
    if dtype not in SUPPORTED_DTYPES:
        return f"the Triton add_layer_norm supports float16, bfloat16, float32, got {dtype}"
    if not 1 <= hidden <= MAX_HIDDEN:
        return f"the Triton add_layer_norm supports hidden sizes 1..{MAX_HIDDEN}, got {hidden}"
    return None


def _row_config(hidden: int) -> Tuple[int, int, bool]:
    """(BLOCK_N, num_warps, WHOLE_ROW) for one row per program: more warps for wider rows, the
    row in one block up to MAX_BLOCK_N. BLOCK_N >= 8: dropout draws 8 columns at a time."""
    block_n = min(max(triton.next_power_of_2(hidden), 8), MAX_BLOCK_N)
    num_warps = min(max(block_n // 256, 1), 16)
    return block_n, num_warps, hidden <= block_n


def _backward_programs(rows: int, device: torch.device) -> int:
    """How many backward programs (= dweight/dbias partials). Depends only on the shape and the
    device, so the reduction order, and hence the result, is the same run after run."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: a few programs keep the partial-sum path exercised
        target = 4
    return max(1, min(rows, target))


def add_layer_norm_forward(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                           eps: float, dropout_p: float, seed: int, store_sum: bool = False,
                           out_dtype: Optional[torch.dtype] = None):
    """(y, mean, rstd), and with store_sum the pre-norm sum dropout(x) + residual as a fourth,
    both in out_dtype (x's if None). x and residual are read in their own dtypes (autocast's bf16
    x beside an fp32 residual: no cast pass)."""
    rows, hidden = x.shape
    y = torch.empty_like(x, dtype=out_dtype)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    s = torch.empty_like(x, dtype=out_dtype) if store_sum else None
    if rows == 0:
        return (y, mean, rstd, s) if store_sum else (y, mean, rstd)
    block_n, num_warps, whole_row = _row_config(hidden)
    launch(_add_layer_norm_fwd_kernel, (rows,),
        x, residual if residual is not None else x, weight, bias, y, mean, rstd,
        s if store_sum else y, hidden, eps, dropout_p, seed,
        HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0.0, BLOCK_N=block_n,
        WHOLE_ROW=whole_row, STORE_SUM=store_sum, num_warps=num_warps,
    )
    return (y, mean, rstd, s) if store_sum else (y, mean, rstd)


def add_layer_norm_backward(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Tensor,
                            mean: Tensor, rstd: Tensor, dropout_p: float, seed: int,
                            dsum: Optional[Tensor] = None
                            ) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """dsum: the gradient of the pre-norm sum as an output (return_residual), or None. dx and
    dresidual in x's and residual's dtypes, dy and dsum in y's: each read or written as it is."""
    rows, hidden = x.shape
    dx = torch.empty_like(x)
    dresidual = torch.empty_like(residual) if residual is not None else None
    programs = _backward_programs(rows, x.device)
    block_n, num_warps, whole_row = _row_config(hidden)
    partial = torch.empty if whole_row else torch.zeros  # chunked rows add into their partials
    dw_partial = partial(programs, hidden, dtype=torch.float32, device=x.device)
    db_partial = partial(programs, hidden, dtype=torch.float32, device=x.device)
    if rows == 0:
        return dx, dresidual, torch.zeros_like(weight), torch.zeros_like(weight)
    launch(_add_layer_norm_bwd_kernel, (programs,),
        dy, x, residual if residual is not None else x, weight, mean, rstd,
        dx, dresidual if dresidual is not None else dx, dw_partial, db_partial,
        dsum if dsum is not None else dy, rows, hidden, triton.cdiv(rows, programs), dropout_p,
        seed, HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0.0, BLOCK_N=block_n,
        WHOLE_ROW=whole_row, HAS_DSUM=dsum is not None, num_warps=num_warps,
    )
    # A fixed-shape torch reduction has a fixed order: deterministic.
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(weight.dtype)
    return dx, dresidual, dweight, dbias
