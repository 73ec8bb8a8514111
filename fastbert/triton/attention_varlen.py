"""Variable-length (packed) attention in Triton: launchers of attention.py's kernels with
IS_VARLEN, per the backend contract in ops.py (arguments arrive validated).

q (total_q, H, D), k and v (total_k, H, D); sequence b owns rows cu_seqlens[b]:cu_seqlens[b + 1].
Grids cover (cdiv(max_seqlen, tile), H, B); the kernels read their sequence's bounds from
cu_seqlens on the device, so nothing here reads device memory or synchronises: the host work is
the allocations and the launches. lse is (H, total_q).

The forward also takes q and k un-rotated with `rotary=(cos, sin, positions_q, positions_k)`:
RoPE (non-interleaved, the first 2 * cos.shape[1] dims of each head) turns the query tile once
and each key tile as it is loaded (rotary_tile.py), saving the apply_rotary pass; positions_*
(total,) int64 index cos/sin per row. The backward takes q and k rotated.
"""
from __future__ import annotations

import triton
import torch

from fastbert.triton import attention as dense
from fastbert.triton.attention import (LOG2E, _attn_fwd_kernel, arch, banded, block_d, flags,
                                       fwd_config, launch_backward, on_device, use_deterministic)
from fastbert.triton.launch import launch


def unsupported(dtype, head_dim, dropout_p=0.0, causal=False, window=(-1, -1)) -> str | None:
    """Why these kernels cannot serve the input, or None (the dense kernels' limits)."""
    return dense.unsupported(dtype, head_dim, dropout_p, causal, window=window)


def rotary_fwd_config(bd: int, dtype: torch.dtype, arch: int = 90, dropout: bool = False,
                      window: bool = False):
    """fwd_config for the forward that turns q and k (ROTARY_HALF): the key tile, its
    half-swapped copy and the cos/sin tiles live in registers beside the scores, so 16-bit tiles
    run on 8 warps (at 128 x 64 x 64 on 4 warps it spilled 96 B on sm_90 and 8 B on sm_80,
    triton 3.9; on 8 it takes 189-195 registers)."""
    m, n, warps, stages = fwd_config(bd, dtype, arch, dropout, window=window)
    return m, n, warps if dtype == torch.float32 else max(warps, 8), stages


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal, dropout_p, scale, seed, window=(-1, -1), rotary=None):
    """-> (out (total_q, H, D) contiguous in q.dtype, lse (H, total_q) fp32)."""
    turn = {}
    if rotary is not None:
        cos, sin, pos_q, pos_k = rotary
        turn = dict(ROTARY_HALF=cos.shape[1], Cos=cos.contiguous(), Sin=sin.contiguous(),
                    PosQ=pos_q, PosK=pos_k)
    total_q, h, d = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    out = dense._alloc((total_q, h, d), q.dtype, q.device)
    lse = dense._alloc((h, total_q), torch.float32, q.device)
    bd = block_d(d)
    config = fwd_config if rotary is None else rotary_fwd_config
    block_m, block_n, warps, stages = config(bd, q.dtype, arch(q.device), dropout_p > 0,
                                             window=banded(window))
    with on_device(q.device):
        launch(_attn_fwd_kernel, (triton.cdiv(max_seqlen_q, block_m), h, batch),
            q, k, v, out, lse, None, None, cu_seqlens_q, cu_seqlens_k,
            q.stride(0), q.stride(0), q.stride(1),  # varlen: the "batch" stride is the row one
            k.stride(0), k.stride(0), k.stride(1),
            v.stride(0), v.stride(0), v.stride(1),
            out.stride(0), out.stride(0), out.stride(1),
            0, lse.stride(0),
            h, max_seqlen_q, max_seqlen_k, d,
            scale * LOG2E, float(dropout_p), int(seed),
            **flags(causal, dropout_p, q.dtype, varlen=True, window=window), **turn,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        )
    return out, lse


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, causal, dropout_p, scale, seed, deterministic,
                              window=(-1, -1)):
    """-> (dq, dk, dv), contiguous, in the shapes and dtypes of q, k, v."""
    dout = dout.contiguous()  # ops.py passes it contiguous; dQ shares its layout and strides
    batch = cu_seqlens_q.shape[0] - 1
    with on_device(q.device):
        return launch_backward(dout, q, k, v, out, lse, None, None, cu_seqlens_q, cu_seqlens_k,
                               batch, max_seqlen_q, max_seqlen_k, (0, lse.stride(0)), causal,
                               dropout_p, scale, seed, use_deterministic(deterministic), window)
