"""Fused scaled-dot-product attention in Triton: launchers of attention_kernels.py for the padded
(dense) layout, and the launch helpers attention_varlen.py shares.

Launches run on the tensors' device (a guard when it is not the current one); tile configs are
chosen per GPU architecture (sm_80 / sm_90), sized so that no fp16/bf16 variant spills registers.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Optional

import torch
import triton

from fastbert.triton.attention_bwd_kernels import (  # noqa: F401 (the kernels are this module's API)
    _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel)
from fastbert.triton.attention_kernels import (  # noqa: F401
    _DTYPES, _INTERPRET, LOG2E, MAX_HEAD_DIM, _attn_fwd_kernel, _key_range_kernel)
from fastbert.triton.launch import TRITON_BEFORE_3_9, launch


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled one to catch unwritten
    elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def exact_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def arch(device: torch.device) -> int:
    """The GPU architecture the configs are chosen for (80 = sm_80, 90 = sm_90, ...); the
    interpreter (CPU tensors) runs the newest configs."""
    return _capability(device.index) if device.type == "cuda" else 90


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: switch to the tensors' one when it differs."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def use_deterministic(deterministic: bool) -> bool:
    return deterministic or torch.are_deterministic_algorithms_enabled()


# Tile shapes per kernel, head dim (padded), element size and GPU architecture: (BLOCK_M,
# BLOCK_N, num_warps, num_stages). The forward and dQ keep a tall query tile in registers, dK/dV a
# tall key tile; fp32 and wide heads get smaller tiles so registers and shared memory suffice.
# fp16/bf16 are sized from what ptxas reports (registers, spills, stack; triton 3.9) for every
# variant BERT launches (head dims 32/64/128, mask/causal/dropout/varlen): none spills on sm_80
# or sm_90. sm_90: dK/dV at head dim <= 64 runs 64x64 tiles on one warpgroup, so every product,
# dQ's included, is a 64-row wgmma issued once (on 2 warpgroups both issued the same products:
# 1.4x the useful MMA work), without software pipelining (2 stages spill 24-72 B in the causal
# dropout variants), 2 CTAs per SM; the former 32-query, 128-key, 4-warp tile put dQ on
# mma.sync, serialising the wgmma pipeline, and spilled 552 B with dropout. At 128 a 64x64 tile
# spills, so it keeps 32 query rows. The 128-row forward tile at head dim <= 64 runs on one
# warpgroup (4 warps, 2 stages; 3 spilled 24 B): each warp's per-tile overhead (loads, barriers,
# wgmma issue) serves twice the elements of 8 warps; with dropout 4 warps spill 84-104 B, so it
# keeps 8 warps, 3 stages.
# sm_80 (mma.sync): the forward with dropout or a key mask on 2 stages (3 spilled 252 B with
# both, 216 B with the mask alone since tiles checking only the mask have their own loop; under
# Triton 3.6 2 stages spill 12 B with both, 44 B with the mask: there 8 warps, or 3 stages);
# dK/dV on 8 warps (the 4-warp tile used a 616 B stack with dropout), at head dim 64 without
# software pipelining (2 stages spilled 8 B in the varlen causal dropout variant).
# Under Triton before 3.9 (TRITON_BEFORE_3_9), with dropout, sm_90's 64x64 dK/dV tile
# spills 12-24 B and sm_80's head-dim-32 forward 32 B, so those take the tiles its ptxas
# compiles spill-free (32x128 on 8 warps; 64x64 on 4).
# A sliding window (ModernBERT's local layers) with dropout, fine-tuning with attention
# dropout: sm_80's forward on 4 warps spilled 4 B, sm_90's dK/dV 64x64 tile beside a key mask
# 36 B; they take 8 warps and the 32x128 tile.
def fwd_config(bd: int, dtype: torch.dtype, arch: int = 90, dropout: bool = False,
               mask: bool = False, causal: bool = False, window: bool = False):
    if dtype == torch.float32:
        return (64, 32, 4, 2) if bd <= 64 else (32, 32, 8, 2) if bd <= 128 else (16, 32, 8, 1)
    if bd <= 64:
        if arch >= 90:
            return (128, 64, 8, 3) if dropout else (128, 64, 4, 2)
        if dropout and bd <= 32 and TRITON_BEFORE_3_9:
            return (64, 64, 4, 2)
        if dropout and window:
            return (128, 64, 8, 2)
        if mask and TRITON_BEFORE_3_9:
            return (128, 64, 8, 2) if dropout else (128, 64, 4, 3)
        if mask and causal and bd > 32:  # 2 stages spilled 44 B (260 B with dropout), 3 none
            return (128, 64, 4, 3)
        return (128, 64, 4, 2) if dropout or mask else (128, 64, 4, 3)
    if bd <= 128:  # 3 stages need 104 KB: sm_86/89 give a block at most 99 KB
        return (128, 64, 8, 2) if 80 < arch < 90 else (128, 64, 8, 3)
    return (64, 32, 8, 2)


def dkdv_config(bd: int, dtype: torch.dtype, arch: int = 90, dropout: bool = False,
                mask: bool = False, window: bool = False):
    if dtype == torch.float32:
        return (32, 64, 4, 2) if bd <= 64 else (32, 32, 8, 2) if bd <= 128 else (16, 32, 8, 1)
    if bd <= 64:
        wide = dropout and (TRITON_BEFORE_3_9 or (window and mask))
        return (64, 64, 4, 1) if arch >= 90 and not wide else (32, 128, 8, 1)
    return (32, 64, 8, 2) if bd <= 128 else (16, 32, 8, 2)


def dq_config(bd: int, dtype: torch.dtype, arch: int = 90):
    if dtype == torch.float32:
        return (64, 32, 4, 2) if bd <= 64 else (32, 32, 8, 2) if bd <= 128 else (16, 32, 8, 1)
    if bd <= 64:  # sm_80: with dQ's full key tiles split from the boundary one, 4 warps
        # spill 80 B (255 registers); 8 take 171
        return (128, 32, 4, 3) if arch >= 90 else (128, 32, 8, 3)
    return (64, 32, 8, 3) if bd <= 128 else (32, 32, 8, 2)


PREPROCESS_BLOCK_M = 64
KEY_RANGE_BLOCK = 256

# The last mask reduced and its key ranges: (weak reference to the mask, its version, ranges).
# Backward gets the mask forward saved, and a model may pass one mask to every layer, so the
# reduction runs once per mask instead of once per launch. The version counter catches in-place
# edits; inference tensors have none and are not cached.
_key_range_cache: Optional[tuple] = None


def key_range(mask: torch.Tensor) -> torch.Tensor:
    """(B, Sk) bool -> (B, 3) int32 (first real key, last real key + 1, end of the dense range:
    the keys from the first up to it are all real); (0, 0, 0) when none."""
    global _key_range_cache
    cached = _key_range_cache
    versioned = not mask.is_inference()
    if versioned and cached is not None and cached[0]() is mask and cached[1] == mask._version:
        return cached[2]
    b, sk = mask.shape
    ranges = torch.empty(b, 3, dtype=torch.int32, device=mask.device)
    if b > 0:
        with on_device(mask.device):
            launch(_key_range_kernel, (b,), mask.view(torch.uint8), ranges, sk,
                   BLOCK=KEY_RANGE_BLOCK)
    if versioned:
        _key_range_cache = (weakref.ref(mask), mask._version, ranges)
    return ranges


def _mask_args(mask: Optional[torch.Tensor]):
    if mask is None:
        return None, None
    return mask.view(torch.uint8), key_range(mask)


def unsupported(dtype, head_dim, dropout_p=0.0, causal=False, has_mask=False,
                window=(-1, -1)) -> Optional[str]:
    """Why these kernels cannot serve the input, or None (every dropout, causal, mask and
    sliding-window setting is served, and varlen as well)."""
    if dtype not in _DTYPES:
        return f"the Triton attention kernels take float16, bfloat16, float32, got {dtype}"
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"the Triton attention kernels take head dims 1..{MAX_HEAD_DIM}, got {head_dim}"
    return None


def banded(window) -> bool:
    """Whether a (left, right) window bounds the keys (the tile configs take it)."""
    return tuple(window) != (-1, -1)


def flags(causal, dropout_p, dtype, has_mask=False, varlen=False, window=(-1, -1)) -> dict:
    """The constexprs of a launch; a sliding window compiles its (left, right) in (-1:
    unbounded), so each model's one window is one variant and the others are unchanged."""
    return dict(IS_CAUSAL=bool(causal), HAS_MASK=has_mask, HAS_DROPOUT=dropout_p > 0.0,
                IS_VARLEN=varlen, EXACT_DOT=exact_dot(dtype), WINDOW_LEFT=int(window[0]),
                WINDOW_RIGHT=int(window[1]))


def attention_forward(q, k, v, mask, causal, dropout_p, scale, seed, window=(-1, -1)):
    """-> (out (B, Sq, H, D) contiguous in q.dtype, lse (B, H, Sq) fp32)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    out = _alloc((b, sq, h, d), q.dtype, q.device)
    lse = _alloc((b, h, sq), torch.float32, q.device)
    with on_device(q.device):
        mask_u8, kv_range = _mask_args(mask)
        bd = block_d(d)
        block_m, block_n, warps, stages = fwd_config(bd, q.dtype, arch(q.device), dropout_p > 0,
                                                     mask is not None, causal, banded(window))
        launch(_attn_fwd_kernel, (triton.cdiv(sq, block_m), h, b),
            q, k, v, out, lse, mask_u8, kv_range, None, None,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            h, sq, sk, d,
            scale * LOG2E, float(dropout_p), int(seed),
            **flags(causal, dropout_p, q.dtype, has_mask=mask is not None, window=window),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        )
    return out, lse


def launch_backward(dout, q, k, v, out, lse, mask_u8, kv_range, cu_q, cu_k, batch, seqlen_q,
                    seqlen_k, lse_strides, causal, dropout_p, scale, seed, deterministic,
                    window=(-1, -1)):
    """The backward kernels for both layouts (dense: cu_q = cu_k = None; varlen: q, k, v, dout,
    out are (total, H, D), seqlen_* the max_seqlen bounds). -> (dq, dk, dv)."""
    varlen = cu_q is not None
    h, d = q.shape[-2], q.shape[-1]
    bd = block_d(d)
    gpu = arch(q.device)
    kernel_flags = flags(causal, dropout_p, q.dtype, has_mask=mask_u8 is not None, varlen=varlen,
                         window=window)
    # varlen rows start at cu_seqlens: the "batch stride" argument is then the row stride
    row_dim = 0 if varlen else 1
    qkv_strides = tuple(s for t in (q, k, v) for s in (t.stride(0), t.stride(row_dim), t.stride(-2)))
    do_strides = (dout.stride(0), dout.stride(row_dim), dout.stride(-2))

    # delta = rowsum(dO * O): per row, so varlen runs it as one batch of total_q rows
    delta = _alloc(lse.shape, torch.float32, q.device)
    pre_rows = out.shape[0] if varlen else seqlen_q
    pre_batch = 1 if varlen else batch
    pre_strides = ((0,) + tuple(out.stride()[:2]), (0,) + tuple(dout.stride()[:2])) if varlen \
        else (tuple(out.stride()[:3]), tuple(dout.stride()[:3]))
    launch(_attn_bwd_preprocess_kernel, (triton.cdiv(pre_rows, PREPROCESS_BLOCK_M), h, pre_batch),
        out, dout, delta, *pre_strides[0], *pre_strides[1],
        h, pre_rows, d, scale, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_D=bd,
    )

    dk = _alloc(k.shape, k.dtype, k.device)
    dv = _alloc(v.shape, v.dtype, v.device)
    if deterministic:
        dq = _alloc(q.shape, q.dtype, q.device)
        dq_acc = None
    else:
        dq = None
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kg_strides = (dk.stride(0), dk.stride(row_dim), dk.stride(-2))

    block_m, block_n, warps, stages = dkdv_config(bd, q.dtype, gpu, dropout_p > 0,
                                                  mask_u8 is not None, banded(window))
    launch(_attn_bwd_dkdv_kernel, (triton.cdiv(seqlen_k, block_n), h, batch),
        q, k, v, dout, lse, delta, dq_acc, dk, dv, mask_u8, kv_range, cu_q, cu_k,
        *qkv_strides, *do_strides, *kg_strides, *lse_strides,
        h, seqlen_q, seqlen_k, d,
        scale, scale * LOG2E, float(dropout_p), int(seed),
        DQ_ATOMIC=not deterministic, **kernel_flags,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, num_warps=warps, num_stages=stages,
    )
    if deterministic:
        block_m, block_n, warps, stages = dq_config(bd, q.dtype, gpu)
        launch(_attn_bwd_dq_kernel, (triton.cdiv(seqlen_q, block_m), h, batch),
            q, k, v, dout, lse, delta, dq, mask_u8, kv_range, cu_q, cu_k,
            *qkv_strides, *do_strides, *lse_strides,
            h, seqlen_q, seqlen_k, d,
            scale, scale * LOG2E, float(dropout_p), int(seed),
            **kernel_flags,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        )
    else:  # the kernel adds up dQ / ds_scale (see _dkdv_tile)
        dq = _alloc(q.shape, q.dtype, q.device)
        torch.mul(dq_acc, scale / (1.0 - dropout_p), out=dq)
    return dq, dk, dv


def attention_backward(dout, q, k, v, out, lse, mask, causal, dropout_p, scale, seed,
                       deterministic, window=(-1, -1)):
    """-> (dq, dk, dv), contiguous, in the shapes and dtypes of q, k, v."""
    b, sq, h, d = q.shape
    dout = dout.contiguous()  # ops.py passes it contiguous; dQ shares its layout and strides
    with on_device(q.device):
        mask_u8, kv_range = _mask_args(mask)
        return launch_backward(dout, q, k, v, out, lse, mask_u8, kv_range, None, None, b, sq,
                               k.shape[1], (lse.stride(0), lse.stride(1)), causal, dropout_p,
                               scale, seed, use_deterministic(deterministic), window)
