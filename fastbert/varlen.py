"""Variable-length (packed) attention: `fastbert.attention_varlen`, FlashAttention's
`flash_attn_varlen_func` argument order, on every backend.

q (total_q, H, D), k and v (total_k, H, D): the tokens of B sequences laid end to end, sequence b
at rows cu_seqlens[b]:cu_seqlens[b + 1]. Nothing is computed on padding, and a length-0 sequence
costs nothing. The Triton and CUDA backends run packed kernels (fastbert/triton/attention.py,
fastbert/cuda.py). The torch backend's CPU forward calls ATen's fused attention once per run of
equal-length sequences on strided views of the packed tokens (no padding, no mask: 2-3x the
padded call below on the dev CPU for BERT batches, benchmarks/README.md "CPU inference"); when the
runs are many and short (their fixed cost dominates), for causal attention with len_q != len_k,
for backward, fp64 and dropout it scatters the tokens into a padded (B, max_seqlen) grid and runs
the dense path there.
"""
from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from fastbert import cpu_attention, ops, reference, rotary as rotary_module, window as sliding
from fastbert.padding import gather_tokens, scatter_tokens, varlen_to_padded_index
from fastbert.torch_backend import TorchBackend

OP = "fastbert.attention_varlen"
# Per-sequence calls each pay ATen's fixed cost (about 0.1-0.2 ms on the 2-core dev CPU: waking the
# OpenMP workers). Measured there at 2 threads (12 heads, 128 random lengths): 10 query tokens per
# call on average ran at par with one padded call, 14 ran 1.2x it, 20 1.65x. Below this many, the
# padded call; a huge value turns the per-sequence path off.
MIN_TOKENS_PER_CALL = 12


def describe_cpu() -> str:
    """One line: how the torch backend runs packed attention on a CPU."""
    return (f"CPU packed attention (torch backend): fp32 forward and backward, dropout "
            f"included, on {cpu_attention.describe()}; otherwise ATen's fused kernel once per "
            f"run of equal-length sequences on views of the packed tokens, when a call averages "
            f">= {MIN_TOKENS_PER_CALL} query tokens (forward, no dropout), a banded layout for a "
            f"sliding window, else one call on a padded view (and for backward and dropout)")


# --------------------------------------------------------------------------------------------
# the torch backend: ATen's fused CPU attention per run of equal-length sequences, or on a
# padded view of the packed tokens
# --------------------------------------------------------------------------------------------

def _visible(cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, causal: bool,
             window: Tuple[int, int]) -> Tensor:
    """(B, 1, max_q, max_k) bool: which keys each query of each sequence may see."""
    len_q = (cu_q[1:] - cu_q[:-1]).view(-1, 1, 1, 1)
    len_k = (cu_k[1:] - cu_k[:-1]).view(-1, 1, 1, 1)
    i = torch.arange(max_q, device=cu_q.device).view(1, 1, max_q, 1)
    j = torch.arange(max_k, device=cu_q.device).view(1, 1, 1, max_k)
    visible = (j < len_k) & (i < len_q)
    offset = j - (i + (len_k - len_q))  # bottom-right aligned within each sequence
    left, right = window
    if causal:
        visible = visible & (offset <= 0)
    if left >= 0:
        visible = visible & (offset >= -left)
    if right >= 0:
        visible = visible & (offset <= right)
    return visible


@dataclass
class _Layout:
    """The padded view of one packed batch: built once per (cu_seqlens, shapes, causal, dtype)
    and reused by every layer of a forward and by backward."""
    batch: int
    idx_q: Tensor  # (total_q,) flat index of each query in the (B * max_q) grid
    idx_k: Tensor
    visible: Tensor  # (B, 1, max_q, max_k) bool
    additive: Tensor  # the same as 0 / -inf in the inputs' dtype, for ATen's fused kernel
    empty_q: Tensor  # (total_q,) bool: queries that see no key


_layouts: "collections.OrderedDict" = collections.OrderedDict()
_LAYOUT_CACHE = 8


def _layout(q, k, cu_q, cu_k, max_q, max_k, causal, window=ops.FULL_WINDOW) -> _Layout:
    # the in-place write counters; inference tensors have none (and cannot be written outside
    # inference mode), so 0 stands for them
    key = (id(cu_q), 0 if cu_q.is_inference() else cu_q._version, id(cu_k),
           0 if cu_k.is_inference() else cu_k._version, q.shape[0], k.shape[0], max_q, max_k,
           causal, window, q.dtype, q.device)
    hit = _layouts.get(key)
    if hit is not None and hit[0]() is cu_q and hit[1]() is cu_k:  # not a recycled id
        _layouts.move_to_end(key)
        return hit[2]
    batch = cu_q.numel() - 1
    idx_q = varlen_to_padded_index(cu_q, q.shape[0], max_q)
    idx_k = varlen_to_padded_index(cu_k, k.shape[0], max_k)
    visible = _visible(cu_q, cu_k, max_q, max_k, causal, window)
    additive = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
    additive.masked_fill_(~visible, float("-inf"))
    empty_q = ~visible.any(-1).reshape(-1).index_select(0, idx_q)
    layout = _Layout(batch, idx_q, idx_k, visible, additive, empty_q)
    _layouts[key] = (weakref.ref(cu_q), weakref.ref(cu_k), layout)
    while len(_layouts) > _LAYOUT_CACHE:
        _layouts.popitem(last=False)
    return layout


def _runs(cu_q: Tensor, cu_k: Tensor) -> list:
    """Consecutive sequences of equal (len_q, len_k), merged: [start_q, start_k, count, len_q,
    len_k] each (the host reads cu_seqlens: free on CPU)."""
    runs: list = []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bq) - 1):
        lq, lk = bq[b + 1] - bq[b], bk[b + 1] - bk[b]
        if runs and runs[-1][3] == lq and runs[-1][4] == lk:
            runs[-1][2] += 1
        else:
            runs.append([bq[b], bk[b], 1, lq, lk])
    return runs


def _forward_per_sequence(q, k, v, runs, causal, scale):
    """ATen's fused CPU attention once per run of equal-length sequences, on strided views of the
    packed q, k, v: no padding, no mask, no copies in. Causal needs len_q == len_k per sequence
    (ATen's is_causal is top-left aligned, the contract's bottom-right is the same then)."""
    total, h, d = q.shape
    out = q.new_empty(total, h, v.shape[2])
    lse = torch.empty(h, total, dtype=torch.float32, device=q.device)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    for start_q, start_k, n, lq, lk in runs:
        if lq == 0:
            continue
        rows = slice(start_q, start_q + n * lq)
        if lk == 0:  # the contract: zeros and lse = +inf for a query that sees no key
            out[rows] = 0.0
            lse[:, rows] = float("inf")
            continue
        keys = slice(start_k, start_k + n * lk)
        o, l = flash(q[rows].view(n, lq, h, d).transpose(1, 2),
                     k[keys].view(n, lk, h, d).transpose(1, 2),
                     v[keys].view(n, lk, h, v.shape[2]).transpose(1, 2), is_causal=causal,
                     scale=scale)
        out[rows].view(n, lq, h, -1).copy_(o.transpose(1, 2))  # (n, H, lq, D) -> (n, lq, H, D)
        lse[:, rows].view(h, n, lq).copy_(l.transpose(0, 1))
    return out, lse


def _packed_band(q, cu_q, cu_k, causal, window, dropout_p: float,
                 backward: bool) -> Optional[sliding.Band]:
    """The blocked layout over the packed tokens themselves (no padding computed) for a window
    finite on both sides, when queries and keys share cu_seqlens (self-attention: within a
    sequence, packed distance is position distance); None otherwise. Its block size: the
    backward's, or for a forward window.forward_block's."""
    band = sliding.bounded(window, causal)
    same = cu_q is cu_k or (cu_q.device.type == "cpu" and torch.equal(cu_q, cu_k))
    if band is None or not same:
        return None
    total = q.shape[0]
    block = sliding.BACKWARD_BLOCK if backward else sliding.forward_block(q, dropout_p)

    def make():
        tokens = torch.arange(total, device=q.device, dtype=cu_q.dtype)
        sequence = torch.searchsorted(cu_q[1:].contiguous(), tokens, right=True)
        return sliding.make_band(1, total, total, *band, q.dtype, q.device,
                                 sequence_ids=sequence, block=block)
    return sliding.cached_band(cu_q, ("varlen", total, band, block, q.dtype, q.device), make)


class _TorchVarlen:
    @staticmethod
    def attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, dropout_p, scale, seed,
                                 window=ops.FULL_WINDOW, rotary=None):
        """rotary: (cos, sin, positions_q, positions_k): q and k come un-rotated. A banded
        layer turns them as it copies them into its block layout; others make the pass."""
        if q.shape[0] == 0 or k.shape[0] == 0:  # no query, or none sees a key (ATen divides by 0)
            return (q.new_zeros(q.shape[0], q.shape[1], v.shape[2]),
                    q.new_full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32))
        # fastbert's CPU kernel reads q, k, v in place, forward and backward
        if cpu_attention.serves(q, k, v):
            if rotary is not None:
                cos, sin, pos_q, pos_k = rotary
                q = TorchBackend.apply_rotary(q, cos, sin, pos_q, False, False)
                k = TorchBackend.apply_rotary(k, cos, sin, pos_k, False, False)
            return cpu_attention.varlen_forward(q, k, v, cu_q, cu_k, causal, scale, window,
                                                dropout_p, seed)
        band = _packed_band(q, cu_q, cu_k, causal, window, dropout_p, backward=False)
        if band is not None:  # a local layer: O(T * window)
            if rotary is not None:
                cos, sin, pos_q, pos_k = rotary
                rotary = (cos, sin, pos_q[None], pos_k[None])
            out, lse = sliding.forward(q[None], k[None], v[None], band, dropout_p, scale, seed,
                                       rotary)
            return out[0], lse[0]
        if rotary is not None:
            cos, sin, pos_q, pos_k = rotary
            q = TorchBackend.apply_rotary(q, cos, sin, pos_q, False, False)
            k = TorchBackend.apply_rotary(k, cos, sin, pos_k, False, False)
        flash = TorchBackend._cpu_flash(q, dropout_p)
        if flash and window == ops.FULL_WINDOW:
            runs = _runs(cu_q, cu_k)
            if q.shape[0] >= MIN_TOKENS_PER_CALL * len(runs) and (
                    not causal or all(lq == lk for _, _, _, lq, lk in runs)):
                return _forward_per_sequence(q, k, v, runs, causal, scale)
        lay = _layout(q, k, cu_q, cu_k, max_q, max_k, causal, window)
        qp = scatter_tokens(q, lay.idx_q, lay.batch, max_q)  # (B, max_q, H, D)
        kp = scatter_tokens(k, lay.idx_k, lay.batch, max_k)
        vp = scatter_tokens(v, lay.idx_k, lay.batch, max_k)
        h = q.shape[1]
        if flash:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                *(t.transpose(1, 2) for t in (qp, kp, vp)), attn_mask=lay.additive, scale=scale)
            out = out.transpose(1, 2)  # (B, max_q, H, D)
        else:
            keep = reference.dropout_keep_mask(seed, (lay.batch, h, max_q, max_k), dropout_p,
                                               q.device) if dropout_p > 0.0 else None
            out, lse = reference.attention_forward(qp, kp, vp, None, False, dropout_p, scale, keep,
                                                   visible=lay.visible)
        out = gather_tokens(out, lay.idx_q)
        lse = lse.transpose(0, 1).reshape(h, -1).index_select(1, lay.idx_q)  # (H, total_q)
        # the contract: zeros and lse = +inf for a query that sees no key
        out = out.masked_fill(lay.empty_q.view(-1, 1, 1), 0.0)
        lse = lse.masked_fill(lay.empty_q.view(1, -1), float("inf"))
        return out.contiguous(), lse.contiguous()

    @staticmethod
    def attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal,
                                  dropout_p, scale, seed, deterministic, window=ops.FULL_WINDOW):
        if q.shape[0] == 0 or k.shape[0] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if cpu_attention.serves_backward(q, k, v):  # as forward chose
            return cpu_attention.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal,
                                                 scale, window, dropout_p, seed)
        band = _packed_band(q, cu_q, cu_k, causal, window, dropout_p, backward=True)
        if band is not None:
            grads = sliding.backward(dout[None], q[None], k[None], v[None], out[None], lse[None],
                                     band, dropout_p, scale, seed)
            return tuple(g[0] for g in grads)
        lay = _layout(q, k, cu_q, cu_k, max_q, max_k, causal, window)
        h = q.shape[1]
        qp = scatter_tokens(q, lay.idx_q, lay.batch, max_q)  # (B, max_q, H, D)
        dop = scatter_tokens(dout, lay.idx_q, lay.batch, max_q)
        op = scatter_tokens(out, lay.idx_q, lay.batch, max_q)
        kp = scatter_tokens(k, lay.idx_k, lay.batch, max_k)
        vp = scatter_tokens(v, lay.idx_k, lay.batch, max_k)
        lse_p = lse.new_full((h, lay.batch * max_q), float("inf")).index_copy_(1, lay.idx_q, lse)
        lse_p = lse_p.view(h, lay.batch, max_q).transpose(0, 1).contiguous()  # (B, H, max_q)
        if TorchBackend._cpu_flash(q, dropout_p):
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                *(t.transpose(1, 2) for t in (dop, qp, kp, vp, op)), lse_p, 0.0, False,
                attn_mask=lay.additive, scale=scale)
            dq, dk, dv = (g.transpose(1, 2) for g in grads)
        else:
            keep = reference.dropout_keep_mask(seed, (lay.batch, h, max_q, max_k), dropout_p,
                                               q.device) if dropout_p > 0.0 else None
            dq, dk, dv = reference.attention_backward(dop, qp, kp, vp, op, lse_p, None, False,
                                                      dropout_p, scale, keep, visible=lay.visible)
        return (gather_tokens(dq, lay.idx_q).contiguous(), gather_tokens(dk, lay.idx_k).contiguous(),
                gather_tokens(dv, lay.idx_k).contiguous())

    @staticmethod
    def unsupported(op, **kw):
        return None


def _impl(backend: str):
    return _TorchVarlen if backend == "torch" else ops._backend_module(backend)


# --------------------------------------------------------------------------------------------
# torch.library ops and autograd
# --------------------------------------------------------------------------------------------

def _varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                    max_seqlen_q: int, max_seqlen_k: int, causal: bool, dropout_p: float,
                    scale: float, seed: Optional[Tensor], deterministic: bool, backend: str,
                    window_left: int = -1, window_right: int = -1, cos: Optional[Tensor] = None,
                    sin: Optional[Tensor] = None, positions_q: Optional[Tensor] = None,
                    positions_k: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """cos, sin, positions_*: q and k come un-rotated; RoPE turns them first (attention_varlen's
    `rotary`): inside the Triton kernel, in the torch backend's banded copy (else its own pass),
    as an apply_rotary pass on CUDA."""
    kw = ops.window_kw((window_left, window_right))
    if cos is not None:
        if backend in ("triton", "torch"):  # the torch backend turns them where it pays
            kw["rotary"] = (cos, sin, positions_q, positions_k)
        else:
            q = rotary_module._rotary(q, cos, sin, positions_q, False, False, backend)
            k = rotary_module._rotary(k, cos, sin, positions_k, False, False, backend)
    out, lse = _impl(backend).attention_varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, dropout_p, scale,
        ops._seed_int(seed), **kw)
    return out, lse


_varlen_fwd = torch.library.custom_op("fastbert::attention_varlen_fwd",
                                      mutates_args=())(_varlen_forward)


@_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, dropout_p, scale,
      seed, deterministic, backend, window_left=-1, window_right=-1, cos=None, sin=None,
      positions_q=None, positions_k=None):
    total, h, d = q.shape
    return q.new_empty(total, h, d), q.new_empty(h, total, dtype=torch.float32)


def _varlen_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, causal: bool, dropout_p: float, scale: float,
                     seed: Optional[Tensor], deterministic: bool, backend: str,
                     window_left: int = -1,
                     window_right: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _impl(backend).attention_varlen_backward(
        dout.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, causal, dropout_p, scale, ops._seed_int(seed), deterministic,
        **ops.window_kw((window_left, window_right)))
    return dq, dk, dv


_varlen_bwd = torch.library.custom_op("fastbert::attention_varlen_bwd",
                                      mutates_args=())(_varlen_backward)


@_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      dropout_p, scale, seed, deterministic, backend, window_left=-1, window_right=-1):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, causal, dropout_p, scale, seed, deterministic, backend,
     window_left, window_right, *turn) = inputs
    out, lse = output
    ctx.inputs = len(inputs)
    ctx.rotary = bool(turn) and turn[0] is not None  # q, k saved un-rotated, and the tables
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed, *(turn if ctx.rotary else ()))
    ctx.args = (max_q, max_k, causal, dropout_p, scale)
    ctx.window = (window_left, window_right)
    ctx.deterministic, ctx.backend = deterministic, backend
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse


def _grad(ctx, dout, dlse):
    if dout is None:
        return (None,) * ctx.inputs
    q, k, v, out, lse, cu_q, cu_k, seed, *turn = ctx.saved_tensors
    if ctx.rotary:  # turn q and k again for the kernels; their gradients turn back after
        cos, sin, pos_q, pos_k = turn
        rotate = ops._backward_impl(ctx, rotary_module._rotary_op, rotary_module._rotary)
        q = rotate(q, cos, sin, pos_q, False, False, ctx.backend)
        k = rotate(k, cos, sin, pos_k, False, False, ctx.backend)
    backward = ops._backward_impl(ctx, _varlen_bwd, _varlen_backward)
    dq, dk, dv = backward(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args, seed,
                          ctx.deterministic, ctx.backend, *ctx.window)
    if ctx.rotary:  # a rotation's gradient is its inverse
        dq = rotate(dq, cos, sin, pos_q, False, True, ctx.backend)
        dk = rotate(dk, cos, sin, pos_k, False, True, ctx.backend)
    return dq, dk, dv, *([None] * (ctx.inputs - 3))


_varlen_fwd.register_autograd(_grad, setup_context=_setup)


# --------------------------------------------------------------------------------------------
# the public op
# --------------------------------------------------------------------------------------------

def _check_cu_seqlens(name: str, cu: Tensor, device: torch.device, total: int, max_seqlen: int,
                      max_name: str) -> None:
    ops._expect_tensor(OP, name, cu)
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{OP}: argument '{name}' expected a 1-D tensor (B + 1,), got shape "
                         f"{tuple(cu.shape)}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{OP}: argument '{name}' expected dtype torch.int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{OP}: argument '{name}' expected to be on {device} like 'q', got "
                         f"{cu.device}")
    if cu.device.type != "cpu" or torch.compiler.is_compiling():
        return  # values on the device (a host sync to read) or symbolic (under torch.compile)
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or bool((lengths < 0).any()):
        raise ValueError(f"{OP}: argument '{name}' expected to start at 0 and never decrease, "
                         f"got {cu.tolist()}")
    if int(cu[-1]) != total:
        raise ValueError(f"{OP}: argument '{name}' expected its last entry to equal the number "
                         f"of packed tokens ({total}), got {int(cu[-1])}")
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest > max_seqlen:
        raise ValueError(f"{OP}: argument '{max_name}' expected >= the longest sequence "
                         f"({longest}), got {max_seqlen}")


def turns_rotary(backend: str, grad: bool, x: Tensor) -> bool:
    """Whether `backend`'s forward on q, k, v like x turns q and k with no pass of its own (in a
    banded layer): Triton always; torch without autograd where ATen's banded path serves (its
    copy into the block layout turns them for free; with autograd its backward would turn q and
    k again and dq, dk back: two passes where apply_rotary's backward makes one), not where
    fastbert's CPU kernel does (it reads q and k in place: one apply_rotary pass on both)."""
    if backend == "torch":
        return not grad and not cpu_attention.takes(x)
    return backend == "triton"


def rotary_pays_in_kernel(window: Tuple[int, int]) -> bool:
    """Whether a layer should have the Triton forward turn q and k rather than make an
    apply_rotary pass first. The fused forward turns each key tile again for every query tile:
    by the static model (sm_90, head dim 64, fp16-bf16) 1.02 -> 1.9-2.0 warp-insns/kFLOP in a
    global layer, 1.34 -> 2.2-2.3 in a window-64 one. A banded layer's attention work per token
    is bounded by its window, so the pass saved (a read and a write of q and k) outweighs the
    extra issue; a global layer's grows with the sequence, and from ~512 tokens its extra issue
    costs about what the pass does. Estimated from instruction counts, not timed on a GPU
    (benchmarks/rope_fusion.py times it). The torch backend's banded path turns them in the
    copy into its block layout, which costs nothing extra (a CPU gain, benchmarks/README.md)."""
    return window[0] >= 0 and window[1] >= 0


def rotary_in_kernel(x: Tensor, dropout_p: float = 0.0, causal: bool = False,
                     window: Tuple[int, int] = ops.FULL_WINDOW) -> bool:
    """Whether attention_varlen(..., rotary=...) on q, k, v like x (its device, dtype and head
    dim, under the autocast state) should turn q and k itself: the layer is banded
    (rotary_pays_in_kernel) and the auto-resolved backend turns them (turns_rotary). Callers
    that can turn them themselves (ModernBERT's layers) pass the tables only then, and keep
    their apply_rotary call otherwise."""
    if not rotary_pays_in_kernel(window):
        return False
    dtype = ops._autocast_dtype(x.device) or x.dtype
    backend = ops.resolve_backend(OP, "auto", x.device, dtype=dtype, head_dim=x.shape[-1],
                                  dropout_p=dropout_p, causal=causal, **ops.window_kw(window))
    return turns_rotary(backend, torch.is_grad_enabled() and x.requires_grad, x)


def _check_rotary(q: Tensor, tables, offsets, batch: int, longest: int) -> None:
    """attention_varlen's rotary=(cos, sin) and rotary_seqlen_offsets, as apply_rotary checks
    its own."""
    if not isinstance(tables, (tuple, list)) or len(tables) != 2:
        raise TypeError(f"{OP}: argument 'rotary' expected a pair (cos, sin) of (S_ro, R / 2) "
                        f"tensors, got {type(tables).__name__}"
                        + (f" of {len(tables)}" if isinstance(tables, (tuple, list)) else ""))
    cos, sin = tables
    rotary_module.check_tables(OP, "q", q, cos, sin,
                               names=("rotary[0] (cos)", "rotary[1] (sin)"))
    start = rotary_module.check_offsets(OP, "rotary_seqlen_offsets", offsets, batch, q, "q")
    if q.shape[0] and longest + start > cos.shape[0]:  # no tokens: nothing to turn
        raise ValueError(f"{OP}: argument 'rotary' expected tables of at least {longest + start} "
                         f"positions (the longest sequence + rotary_seqlen_offsets), got "
                         f"{cos.shape[0]}")


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     window_size: Tuple[int, int] = ops.FULL_WINDOW, dropout_p: float = 0.0,
                     softmax_scale: Optional[float] = None, deterministic: bool = False,
                     rotary: Optional[Tuple[Tensor, Tensor]] = None,
                     rotary_seqlen_offsets: Union[int, Tensor] = 0,
                     backend: str = "auto") -> Tensor:
    """Attention over packed sequences. q (total_q, H, D), k and v (total_k, H, D) -> (total_q, H, D).

    cu_seqlens_* int32 (B + 1,): sequence b is rows cu[b]:cu[b + 1]. max_seqlen_* bound every
    length (an upper bound is fine, e.g. the padded length: no host sync). causal: local query i
    sees local keys j <= i + len_k - len_q. window_size (left, right): local query i sees local
    keys i + len_k - len_q - left <= j <= i + len_k - len_q + right (-1 = unbounded), as in
    flash-attn. A query that sees no key returns zeros.

    rotary=(cos, sin): q and k are un-rotated; RoPE turns them first, as
    `apply_rotary(x, cos, sin, cu_seqlens=cu_seqlens_*, max_seqlen=max_seqlen_*,
    seqlen_offsets=rotary_seqlen_offsets)` would (non-interleaved; positions restart per
    sequence, shifted by the offsets: an int, or (B,) per sequence). The Triton backend turns
    them inside its forward kernel as the tiles load, saving that pass over q and k (its
    backward turns them again for the gradient kernels and turns dq, dk back); the torch
    backend's banded path (a finite window) writes them turned into the block layout it copies
    them to anyway; otherwise (CUDA, the torch backend's other paths) apply_rotary runs, then
    attention. cos and sin get no gradient.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        ops._expect_tensor(OP, name, t)
        if t.dim() != 3:
            raise ValueError(f"{OP}: argument '{name}' expected a 3-D tensor (total, H, D), got "
                             f"shape {tuple(t.shape)}")
        ops._expect_float(OP, name, t)
        ops._expect_same_device(OP, "q", q, name, t)
    if not (k.dtype == q.dtype and v.dtype == q.dtype):
        raise TypeError(f"{OP}: arguments 'q', 'k', 'v' expected one dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    total_q, h, d = q.shape
    total_k = k.shape[0]
    if tuple(k.shape) != (total_k, h, d) or tuple(v.shape) != (total_k, h, d):
        raise ValueError(f"{OP}: arguments 'k' and 'v' expected shape (total_k, H={h}, D={d}) "
                         f"with one total_k, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if not 1 <= d <= ops.MAX_HEAD_DIM:
        raise ValueError(f"{OP}: argument 'q' expected head dim 1..{ops.MAX_HEAD_DIM}, got {d}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{OP}: argument '{name}' expected a non-negative Python int, got "
                             f"{m!r}")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, total_q, max_seqlen_q, "max_seqlen_q")
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, total_k, max_seqlen_k, "max_seqlen_k")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"{OP}: arguments 'cu_seqlens_q' and 'cu_seqlens_k' expected one batch "
                         f"size, got shapes {tuple(cu_seqlens_q.shape)} and "
                         f"{tuple(cu_seqlens_k.shape)}")
    window = ops._window(OP, window_size)
    dropout_p = ops._expect_dropout(OP, dropout_p)
    softmax_scale = ops._softmax_scale(OP, softmax_scale, d)
    if rotary is not None:
        _check_rotary(q, rotary, rotary_seqlen_offsets, cu_seqlens_q.shape[0] - 1,
                      max(max_seqlen_q, max_seqlen_k))
    q, k, v = ops._attention_operands(q, k, v)
    chosen = ops.resolve_backend(OP, backend, q.device, dtype=q.dtype, head_dim=d,
                                 dropout_p=dropout_p, causal=bool(causal), **ops.window_kw(window))
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    turn = ()
    if rotary is not None:  # the tables and every row's position ride after the window
        pos_q = rotary_module._positions(q, cu_q, rotary_seqlen_offsets)
        pos_k = pos_q if cu_seqlens_k is cu_seqlens_q and total_k == total_q else \
            rotary_module._positions(k, cu_k, rotary_seqlen_offsets)
        turn = (rotary[0].contiguous(), rotary[1].contiguous(), pos_q, pos_k)
    args = (q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal), dropout_p,
            float(softmax_scale), ops._draw_seed(dropout_p), bool(deterministic), chosen, *window,
            *turn)
    if ops._inference(q, k, v):  # no autograd: skip the custom op's dispatch
        return _varlen_forward(*args)[0]
    if ops._eager(q, k, v, cu_q, cu_k):
        return ops.eager_apply("fastbert::attention_varlen", _varlen_forward, _setup, _grad,
                               *args)[0]
    return _varlen_fwd(*args)[0]
