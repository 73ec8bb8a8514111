"""Triton kernels for out = gelu(x @ weight.T + bias): forward GEMM with a fused epilogue, fused
dGELU + dbias for backward, and their launchers.

Forward follows Triton tutorial 03 (matmul): (BLOCK_M, BLOCK_N) output tiles, grouped launch order
so consecutive programs reuse the same weight columns from L2, fp32 accumulation. The epilogue adds
the bias, applies GELU and writes the activation, and the pre-activation when backward will need it.

Backward: one memory-bound Triton pass reads dout and pre once, writes dpre = dout * gelu'(pre)
and per-program dbias partials (deterministic: fixed rows per program, one torch reduction). The
two GEMMs dx = dpre @ W and dW = dpre.T @ x then go to torch.matmul (cuBLAS): on H100 cuBLAS is at
least as fast as a Triton GEMM for these plain layouts, and fusing dGELU into a Triton GEMM's
prologue would have to recompute it in both GEMMs (or write dpre anyway), so it saves no traffic.
Autograd lives in fastbert/linear_gelu.py; this module only runs kernels.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastbert.triton.launch import launch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _config(block_m, block_n, block_k, stages, warps, group_m=8):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                          "GROUP_M": group_m}, num_stages=stages, num_warps=warps)


# The 8-warp 128x128 tile suits Hopper (wgmma, 227 KB shared memory); the 4-warp, deeper-pipelined
# ones suit Ampere (163 KB) and small or skinny problems. Configs whose pipeline buffers do not fit a
# device's shared memory (large fp32 tiles) are pruned before autotuning, see below. Left out on
# purpose: 128x256x64 with 8 warps and 128x128x32 with 4 warps. Their fp32 accumulator plus the
# two-output epilogue needs over 255 registers a thread: ptxas spills 0.7-0.9 KB per thread on sm_80
# and sm_90 (tests/test_resources.py reads it from the compiled code and fails on any spill).
GPU_CONFIGS = [
    _config(128, 128, 64, stages=3, warps=8),
    _config(128, 64, 32, stages=4, warps=4),
    _config(64, 128, 32, stages=4, warps=4),
    _config(64, 64, 32, stages=5, warps=2),
]
# Multi-config autotuning fails under the interpreter, so it gets exactly one (small tiles, so
# that odd test shapes still span several tiles and exercise the edge masks).
INTERPRETER_CONFIGS = [_config(32, 32, 32, stages=1, warps=4, group_m=4)]
CONFIGS = INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS


def pipeline_shared_memory(config: triton.Config, element_size: int) -> int:
    """Bytes of shared memory the main loop's pipeline holds: num_stages x and W.T tiles."""
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * element_size


def configs_that_fit(configs, element_size: int, shared_memory: int):
    """The configs whose pipeline fits `shared_memory` bytes (at least the smallest one)."""
    fitting = [c for c in configs if pipeline_shared_memory(c, element_size) <= shared_memory]
    return fitting or [min(configs, key=lambda c: pipeline_shared_memory(c, element_size))]


def _prune_to_shared_memory(configs, named_args, **kwargs):
    # Compiling a config only to see it fail to launch costs seconds of autotuning per shape.
    x = named_args["X"]
    if x.device.type != "cuda":
        return configs
    properties = triton.runtime.driver.active.utils.get_device_properties(x.device.index)
    return configs_that_fit(configs, x.element_size(), properties["max_shared_mem"])

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# Abramowitz & Stegun 7.1.26, erfc(z) = t (a1 + t (a2 + ... + t a5)) exp(-z^2), t = 1 / (1 + p z),
# written for z = |x| / sqrt(2) and with the a_i halved (the 0.5 of GELU).
_AS_P = tl.constexpr(0.3275911 * 0.7071067811865476)
_AS_HALF_A1 = tl.constexpr(0.5 * 0.254829592)
_AS_HALF_A2 = tl.constexpr(0.5 * -0.284496736)
_AS_HALF_A3 = tl.constexpr(0.5 * 1.421413741)
_AS_HALF_A4 = tl.constexpr(0.5 * -1.453152027)
_AS_HALF_A5 = tl.constexpr(0.5 * 1.061405429)
_MINUS_HALF_LOG2E = tl.constexpr(-0.5 * 1.4426950408889634)


@triton.jit
def _gelu_erf_half(pre):
    """0.5 * pre * (1 + erf(pre / sqrt(2))) for fp16/bf16 outputs, from erfc(|pre| / sqrt(2)) by
    Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, well under the output's rounding).
    One coefficient set and two MUFU ops: libdevice's erff selects between two sets per element,
    ~2x the instructions of the GEMM's epilogue. Negative inputs take erfc itself, so 1 + erf
    does not cancel."""
    # (tensor first in each product and sum: the interpreter keeps constexpr * tensor a constexpr)
    root = tl.math.rsqrt(tl.abs(pre) * _AS_P + 1.0)  # 1 / (1 + p z) as rsqrt squared: one MUFU
    t = root * root
    half_poly = t * (t * (t * (t * (t * _AS_HALF_A5 + _AS_HALF_A4) + _AS_HALF_A3) + _AS_HALF_A2)
                     + _AS_HALF_A1)
    half_erfc = half_poly * tl.math.exp2(pre * _MINUS_HALF_LOG2E * pre)
    return pre * tl.where(pre >= 0.0, 1.0 - half_erfc, half_erfc)


@triton.jit
def _gelu(pre, APPROXIMATE_TANH: tl.constexpr, HALF_OUTPUT: tl.constexpr = False):
    if APPROXIMATE_TANH:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u); avoids a tanh, which not every backend exposes.
        u = _SQRT_2_OVER_PI * (pre + 0.044715 * pre * pre * pre)
        return pre * tl.sigmoid(2.0 * u)
    elif HALF_OUTPUT:
        return _gelu_erf_half(pre)
    else:
        return 0.5 * pre * (1.0 + tl.math.erf(pre * _INV_SQRT_2))


@triton.jit
def _gelu_grad(pre, APPROXIMATE_TANH: tl.constexpr):
    if APPROXIMATE_TANH:
        u = _SQRT_2_OVER_PI * (pre + 0.044715 * pre * pre * pre)
        sig = tl.sigmoid(2.0 * u)  # = 0.5 * (1 + tanh(u)), so 0.5 * (1 - tanh^2) = 2 sig (1 - sig)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * pre * pre)
        return sig + pre * 2.0 * sig * (1.0 - sig) * du
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(pre * _INV_SQRT_2))
        pdf = tl.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
        return cdf + pre * pdf


def rows_bucket(m: int) -> int:
    """The autotuning key for M rows: the next power of two, so that a new padded batch shape (or
    packed token count) reuses the choice made for its bucket instead of autotuning again."""
    return triton.next_power_of_2(max(m, 1))


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile) in grouped order: GROUP_M row-tiles are swept
    together, so the W tiles they share stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % pids_per_group) % group_size_m)
    pid_n = (pid % pids_per_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _bias_gelu_store(acc, offs_m, offs_n, BIAS, OUT, PRE, M, N, APPROXIMATE_TANH: tl.constexpr,
                     STORE_PRE: tl.constexpr):
    """The epilogue of one (rows, columns) block of the accumulator: + bias, GELU, stores."""
    bias = tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    pre = acc + bias[None, :]
    out = _gelu(pre, APPROXIMATE_TANH, OUT.dtype.element_ty != tl.float32)
    out_offsets = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if STORE_PRE:  # only backward reads it
        tl.store(PRE + out_offsets, pre.to(PRE.dtype.element_ty), mask=in_bounds)
    tl.store(OUT + out_offsets, out.to(OUT.dtype.element_ty), mask=in_bounds)


# M_BUCKET is read only by the autotuner (its key); never specialised, so it adds no variants.
@triton.autotune(configs=CONFIGS, key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_to_shared_memory})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _linear_bias_gelu_fwd_kernel(
    X, W, BIAS, OUT, PRE, M, N, K, M_BUCKET,
    APPROXIMATE_TANH: tl.constexpr, STORE_PRE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap around to valid ones (their results are never stored),
    # so the main loop only masks along K.
    rows_x = (offs_m % M).to(tl.int64)
    rows_w = (offs_n % N).to(tl.int64)
    x_ptrs = X + rows_x[:, None] * K + offs_k[None, :]  # (BLOCK_M, BLOCK_K) tile of x
    w_ptrs = W + rows_w[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N) tile of W.T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        a = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
        if UPCAST_DOT:
            # The interpreter computes bf16 tl.dot wrongly (it multiplies the raw bits); the
            # launcher sets UPCAST_DOT only under TRITON_INTERPRET=1 with bf16 inputs.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # Tiles at least as tall as wide run the epilogue in two column halves (the split only
    # renames the accumulator's registers): half the GELU temporaries and output tiles are live
    # at once, so 128x128 takes 119 registers instead of 145 on sm_90 and fits 2 CTAs per SM,
    # where one CTA's epilogue issues under the other's K loop. (64x128 measured 3% more
    # epilogue instructions split.)
    if BLOCK_M >= BLOCK_N:
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)),
                                          (0, 2, 1)))
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _bias_gelu_store(left, offs_m, offs_n, BIAS, OUT, PRE, M, N, APPROXIMATE_TANH,
                         STORE_PRE)
        _bias_gelu_store(right, offs_m, offs_n + BLOCK_N // 2, BIAS, OUT, PRE, M, N,
                         APPROXIMATE_TANH, STORE_PRE)
    else:
        _bias_gelu_store(acc, offs_m, offs_n, BIAS, OUT, PRE, M, N, APPROXIMATE_TANH, STORE_PRE)


@triton.jit
def _gelu_bwd_dbias_kernel(
    DOUT, PRE, DPRE, DBIAS_PARTIAL, M, N, rows_per_program,
    APPROXIMATE_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dpre = dout * gelu'(pre) over a fixed row range, plus that range's column sums (dbias)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    row_start = pid_m.to(tl.int64) * rows_per_program  # a multiple of BLOCK_M
    row_end = tl.minimum(row_start + rows_per_program, M)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_bounds = (offs_m < M)[:, None] & n_in[None, :]
        offsets = offs_m[:, None] * N + offs_n[None, :]
        dout = tl.load(DOUT + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        pre = tl.load(PRE + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        dpre = dout * _gelu_grad(pre, APPROXIMATE_TANH)  # 0 where masked, since dout = 0
        tl.store(DPRE + offsets, dpre.to(DPRE.dtype.element_ty), mask=in_bounds)
        dbias += tl.sum(dpre, axis=0)
    tl.store(DBIAS_PARTIAL + pid_m * N + offs_n, dbias, mask=n_in)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

# Backward dGELU tiles, and how many row ranges (dbias partials) it splits M into; fixed numbers,
# so the partial sums and their reduction order depend only on the shape.
BWD_BLOCK_M, BWD_BLOCK_N, BWD_NUM_WARPS = 32, 128, 4
BWD_ROW_RANGES = 64


def unsupported(dtype: torch.dtype, in_features: int, out_features: int) -> Optional[str]:
    """Why these kernels cannot serve the input, or None."""
    if dtype not in SUPPORTED_DTYPES:
        return f"the Triton linear_bias_gelu supports float16, bfloat16, float32, got {dtype}"
    if in_features < 1 or out_features < 1:
        return (f"the Triton linear_bias_gelu needs in_features and out_features >= 1, got "
                f"{in_features} and {out_features}")
    return None


def forward_constexprs(dtype: torch.dtype, approximate: str, store_pre: bool = True) -> dict:
    """The constexpr flags the forward launcher passes for an input dtype (besides the tiles)."""
    return {
        "APPROXIMATE_TANH": approximate == "tanh",
        "STORE_PRE": store_pre,
        # fp32 inputs: true fp32 products, as torch does with TF32 off (the fp32 ~1e-5 contract).
        "DOT_PRECISION": "ieee",
        "UPCAST_DOT": INTERPRET and dtype == torch.bfloat16,
    }


def linear_bias_gelu_forward(x: Tensor, weight: Tensor, bias: Tensor, approximate: str,
                             store_pre: bool = True) -> Tuple[Tensor, Tensor]:
    """-> (out, pre), both (M, N). With store_pre=False (no gradient will be asked for) the
    pre-activation is not written and `pre` is an empty (0, N) tensor: an M x N store saved."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    pre = torch.empty(m if store_pre else 0, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out, pre

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    launch(_linear_bias_gelu_fwd_kernel, grid, x, weight, bias, out, pre if store_pre else out,
           m, n, k, rows_bucket(m), **forward_constexprs(x.dtype, approximate, store_pre))
    return out, pre


def backward_launch(m: int, n: int) -> Tuple[Tuple[int, int], int]:
    """(grid, rows_per_program) of the dGELU + dbias kernel."""
    row_blocks = triton.cdiv(m, BWD_BLOCK_M)
    row_ranges = max(1, min(row_blocks, BWD_ROW_RANGES))
    rows_per_program = triton.cdiv(row_blocks, row_ranges) * BWD_BLOCK_M
    return (triton.cdiv(m, rows_per_program), triton.cdiv(n, BWD_BLOCK_N)), rows_per_program


def linear_bias_gelu_backward(dout: Tensor, x: Tensor, weight: Tensor, pre: Tensor,
                              approximate: str) -> Tuple[Tensor, Tensor, Tensor]:
    m, n = pre.shape
    if m == 0:
        return torch.zeros_like(x), torch.zeros_like(weight), weight.new_zeros(n)
    dpre = torch.empty_like(pre)
    grid, rows_per_program = backward_launch(m, n)
    dbias_partial = torch.empty(grid[0], n, dtype=torch.float32, device=x.device)
    launch(_gelu_bwd_dbias_kernel, grid, dout, pre, dpre, dbias_partial, m, n, rows_per_program,
           APPROXIMATE_TANH=approximate == "tanh", BLOCK_M=BWD_BLOCK_M, BLOCK_N=BWD_BLOCK_N,
           num_warps=BWD_NUM_WARPS)
    dx = torch.matmul(dpre, weight)  # (M, N) @ (N, K)
    dweight = torch.matmul(dpre.t(), x)  # (N, M) @ (M, K)
    dbias = dbias_partial.sum(0).to(weight.dtype)
    return dx, dweight, dbias
