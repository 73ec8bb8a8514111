"""Triton kernels for out = gelu(x @ W_a.T + b_a) * (x @ W_g.T + b_g), weight = [W_a; W_g]
(ModernBERT's Wi): the GEMM with both halves' tiles accumulated side by side and the GeGLU in its
epilogue, and the fused dGeGLU + dbias pass for backward.

Forward: linear_gelu.py's tiled GEMM (its configs, grouped order and autotuning), each program
accumulating the GELU half's (BLOCK_M, BLOCK_N) tile and the gate half's matching one, so the
(M, 2N) product never goes through memory; the pre-activation (M, 2N) is written only when
backward will need it. Backward: one memory-bound pass reads dout and pre once and writes
dpre = [dout * g * gelu'(a), dout * gelu(a)] with per-program dbias partials; the two GEMMs
then go to torch.matmul, as in linear_gelu.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastbert.triton.launch import TRITON_BEFORE_3_9, launch
from fastbert.triton.linear_gelu import (BWD_BLOCK_M, BWD_NUM_WARPS, INTERPRET,
                                         INTERPRETER_CONFIGS, SUPPORTED_DTYPES, _config, _gelu,
                                         _gelu_grad, _prune_to_shared_memory, backward_launch,
                                         forward_constexprs, grouped_tile, rows_bucket)

# Two fp32 accumulators per program (the GELU half's tile and the gate half's): linear_gelu.py's
# tiles per warp doubled, and every one of its configs spilled (1.3-13 KB on sm_80/sm_90). These
# hold half its accumulator per thread. The 64x64 tile on 4 warps spills 8 B on sm_80 under
# Triton before 3.9, so there it takes 8.
GPU_CONFIGS = [
    _config(128, 64, 32, stages=3, warps=8),
    _config(64, 128, 32, stages=3, warps=8),
    _config(64, 64, 32, stages=4, warps=8 if TRITON_BEFORE_3_9 else 4),
]
CONFIGS = INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS

# Backward columns per program: half of linear_gelu's 128, as each element carries both halves
# (dout, a, g, da, dg); 128 spilled on sm_80 and sm_90.
BWD_BLOCK_N = 64


@triton.autotune(configs=CONFIGS, key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_to_shared_memory})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _linear_geglu_fwd_kernel(
    X, W, BIAS, OUT, PRE, M, N, K, M_BUCKET,  # N: output columns (W has 2N rows)
    HAS_BIAS: tl.constexpr, APPROXIMATE_TANH: tl.constexpr, STORE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_x = (offs_m % M).to(tl.int64)  # past the edge: wrapped, never stored
    rows_w = (offs_n % N).to(tl.int64)
    x_ptrs = X + rows_x[:, None] * K + offs_k[None, :]
    wa_ptrs = W + rows_w[None, :] * K + offs_k[:, None]  # the GELU half's W.T tile
    wg_ptrs = wa_ptrs + N * K  # the gate half's

    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
        wa = tl.load(wa_ptrs, mask=k_in[:, None], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_in[:, None], other=0.0)
        if UPCAST_DOT:  # the interpreter's bf16 tl.dot is wrong (see linear_gelu.py)
            x = x.to(tl.float32)
            wa = wa.to(tl.float32)
            wg = wg.to(tl.float32)
        acc_a = tl.dot(x, wa, acc_a, input_precision=DOT_PRECISION)
        acc_g = tl.dot(x, wg, acc_g, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        wa_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K

    n_in = offs_n < N
    if HAS_BIAS:
        acc_a += tl.load(BIAS + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(BIAS + N + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    out = _gelu(acc_a, APPROXIMATE_TANH, OUT.dtype.element_ty != tl.float32) * acc_g
    rows = offs_m.to(tl.int64)[:, None]
    in_bounds = (offs_m[:, None] < M) & n_in[None, :]
    if STORE_PRE:  # only backward reads it: (M, 2N), the GELU half then the gate half
        tl.store(PRE + rows * (2 * N) + offs_n[None, :], acc_a.to(PRE.dtype.element_ty),
                 mask=in_bounds)
        tl.store(PRE + rows * (2 * N) + N + offs_n[None, :], acc_g.to(PRE.dtype.element_ty),
                 mask=in_bounds)
    tl.store(OUT + rows * N + offs_n[None, :], out.to(OUT.dtype.element_ty), mask=in_bounds)


@triton.jit
def _geglu_bwd_dbias_kernel(
    DOUT, PRE, DPRE, DBIAS_PARTIAL, M, N, rows_per_program,
    APPROXIMATE_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dpre = [dout * g * gelu'(a), dout * gelu(a)] over a fixed row range, and that range's
    column sums (dbias partials, (programs, 2N))."""
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    row_start = pid_m.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    dbias_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbias_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_bounds = (offs_m < M)[:, None] & n_in[None, :]
        pre_a = PRE + offs_m[:, None] * (2 * N) + offs_n[None, :]
        dout = tl.load(DOUT + offs_m[:, None] * N + offs_n[None, :], mask=in_bounds,
                       other=0.0).to(tl.float32)
        a = tl.load(pre_a, mask=in_bounds, other=0.0).to(tl.float32)
        g = tl.load(pre_a + N, mask=in_bounds, other=0.0).to(tl.float32)
        da = dout * g * _gelu_grad(a, APPROXIMATE_TANH)  # 0 where masked: dout = 0
        dg = dout * _gelu(a, APPROXIMATE_TANH)
        dpre_a = DPRE + offs_m[:, None] * (2 * N) + offs_n[None, :]
        tl.store(dpre_a, da.to(DPRE.dtype.element_ty), mask=in_bounds)
        tl.store(dpre_a + N, dg.to(DPRE.dtype.element_ty), mask=in_bounds)
        dbias_a += tl.sum(da, axis=0)
        dbias_g += tl.sum(dg, axis=0)
    tl.store(DBIAS_PARTIAL + pid_m * (2 * N) + offs_n, dbias_a, mask=n_in)
    tl.store(DBIAS_PARTIAL + pid_m * (2 * N) + N + offs_n, dbias_g, mask=n_in)


def unsupported(dtype: torch.dtype, in_features: int, out_features: int) -> Optional[str]:
    """Why these kernels cannot serve the input, or None (out_features: the 2N rows of W)."""
    if dtype not in SUPPORTED_DTYPES:
        return f"the Triton linear_geglu supports float16, bfloat16, float32, got {dtype}"
    if in_features < 1 or out_features < 2:
        return (f"the Triton linear_geglu needs in_features >= 1 and out_features >= 2, got "
                f"{in_features} and {out_features}")
    return None


def linear_geglu_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str,
                         store_pre: bool = True) -> Tuple[Tensor, Tensor]:
    """-> (out (M, N), pre (M, 2N)). With store_pre=False (no gradient will be asked for) the
    pre-activation is not written and `pre` is an empty (0, 2N) tensor: an M x 2N store saved."""
    m, k = x.shape
    n = weight.shape[0] // 2
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    pre = torch.empty(m if store_pre else 0, 2 * n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out, pre

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    launch(_linear_geglu_fwd_kernel, grid, x, weight, bias if bias is not None else weight, out,
           pre if store_pre else out, m, n, k, rows_bucket(m), HAS_BIAS=bias is not None,
           **forward_constexprs(x.dtype, approximate, store_pre))
    return out, pre


def linear_geglu_backward(dout: Tensor, x: Tensor, weight: Tensor, pre: Tensor,
                          approximate: str) -> Tuple[Tensor, Tensor, Tensor]:
    m, n2 = pre.shape
    if m == 0:
        return torch.zeros_like(x), torch.zeros_like(weight), weight.new_zeros(n2)
    dpre = torch.empty_like(pre)
    (row_programs, _), rows_per_program = backward_launch(m, n2 // 2)
    grid = (row_programs, triton.cdiv(n2 // 2, BWD_BLOCK_N))
    dbias_partial = torch.empty(grid[0], n2, dtype=torch.float32, device=x.device)
    launch(_geglu_bwd_dbias_kernel, grid, dout, pre, dpre, dbias_partial, m, n2 // 2,
           rows_per_program, APPROXIMATE_TANH=approximate == "tanh", BLOCK_M=BWD_BLOCK_M,
           BLOCK_N=BWD_BLOCK_N, num_warps=BWD_NUM_WARPS)
    dx = torch.matmul(dpre, weight)  # (M, 2N) @ (2N, K)
    dweight = torch.matmul(dpre.t(), x)
    return dx, dweight, dbias_partial.sum(0).to(weight.dtype)
