"""Sliding-window (local) attention on the torch backend in O(S * window), never O(S^2).

The queries of each sequence are cut into blocks of `block` rows; a block attends only to the span
of keys its band can reach (block + left + right of them), gathered once into a
(blocks, span, H, D) tensor. One ATen fused-attention call (or the reference math for fp64,
dropout and non-CPU tensors) then runs every block at once, with an additive mask for the band,
the key-padding mask and sequence boundaries. Backward runs on such a layout too (its own block
size) and adds each span's dK/dV back onto the keys it was gathered from.

    band = make_band(..., block=forward_block(q, dropout_p))   # once per mask / cu_seqlens
    out, lse = forward(q, k, v, band, dropout_p, scale, seed)        # q (N, Sq, H, D)
    out, lse = forward(q, k, v, band, ..., rotary=(cos, sin, pos_q, pos_k))  # RoPE on the way in
    band = make_band(..., block=BACKWARD_BLOCK)
    dq, dk, dv = backward(dout, q, k, v, out, lse, band, dropout_p, scale, seed)

Padded attention is N = B sequences; packed self-attention (cu_seqlens_q == cu_seqlens_k) is one
sequence of all T tokens where keys of another sequence are masked, so no padding is computed.
"""
from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastbert import cpu, reference

# Query rows per block: each block computes block x (block + left + right) scores, so the work is
# S * (block + window); smaller blocks waste less but gather the keys more often. Measured on the
# dev CPU (Zen 5, 2 threads; ModernBERT-base local layer, 2679 packed tokens, window 128), forward
# ATen kernel plus copies: 16 rows 9.9 ms, 32 9.8, 64 11.4, 128 14.4; backward, where every span's
# dK/dV is added back onto its keys: 32 rows 47.9 ms, 48 40.7, 64 31.6, 96 35.3. A forward whose
# q requires grad (a training step) uses the backward's blocks, so one band serves both (with
# grads for k and v only, each builds its own: lse travels per query, so either is correct); so
# does one with dropout, whose mask is drawn over the block layout (forward_block).
FORWARD_BLOCK = 32
BACKWARD_BLOCK = 64


def forward_block(q: Tensor, dropout_p: float) -> int:
    """The query rows per block of a forward on q."""
    return BACKWARD_BLOCK if dropout_p > 0.0 or q.requires_grad else FORWARD_BLOCK


def bounded(window: Tuple[int, int], causal: bool) -> Optional[Tuple[int, int]]:
    """(left, right) when the band is finite on both sides (causal bounds the right at 0), so the
    blocked path applies; None when a query can see unboundedly many keys."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return (left, right) if left >= 0 and right >= 0 else None


@dataclass
class Band:
    """The blocked layout of one attention call, shared by forward and backward."""
    n: int  # sequences (N)
    sq: int
    sk: int
    blocks: int  # query blocks per sequence
    span: int  # keys each block sees
    first: int  # the key row block 0 starts at (sk - sq - left; negative: before the keys)
    block: int  # query rows per block
    key_index: Tensor  # (N * blocks * span,) row of the flattened (N * Sk) keys, clamped in range
    visible: Tensor  # (N * blocks, 1, block, span) bool
    additive: Tensor  # the same as 0 / -inf in the inputs' dtype, for ATen
    empty: Tensor  # (N, Sq) bool: queries that see no key
    has_empty: bool  # empty.any(), read once (every packed query sees itself in a band)


def make_band(n: int, sq: int, sk: int, left: int, right: int, dtype: torch.dtype, device,
              key_padding_mask: Optional[Tensor] = None,
              sequence_ids: Optional[Tensor] = None, *, block: int) -> Band:
    """Query i sees key j when i + Sk - Sq - left <= j <= i + Sk - Sq + right, the key is real
    (key_padding_mask (N, Sk)) and, for packed tokens, both belong to one sequence
    (sequence_ids (Sq,), with Sq == Sk)."""
    blocks = max(1, -(-sq // block))
    span = block + left + right
    shift = sk - sq
    i = torch.arange(blocks * block, device=device).view(blocks, block, 1)  # query row
    first = torch.arange(blocks, device=device).view(blocks, 1, 1) * block + shift - left
    j = first + torch.arange(span, device=device).view(1, 1, span)  # (blocks, 1, span) key row
    offset = j - (i + shift)
    visible = (offset >= -left) & (offset <= right) & (i < sq) & (j >= 0) & (j < sk)
    key = j.clamp(0, max(sk - 1, 0)).view(1, blocks, span)
    visible = visible.unsqueeze(0)  # (1, blocks, block, span)
    if sequence_ids is not None:
        seq_q = F.pad(sequence_ids, (0, blocks * block - sq), value=-1).view(1, blocks, block, 1)
        visible = visible & (seq_q == sequence_ids[key].view(1, blocks, 1, span))
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.bool()[:, key.view(-1)].view(n, blocks, 1, span)
    visible = visible.expand(n, blocks, block, span).reshape(n * blocks, 1, block, span)
    key_index = (key + torch.arange(n, device=device).view(n, 1, 1) * sk).reshape(-1)
    additive = torch.zeros(visible.shape, dtype=dtype, device=device)
    additive.masked_fill_(~visible, float("-inf"))
    empty = ~visible.any(-1).view(n, blocks * block)[:, :sq]
    return Band(n, sq, sk, blocks, span, shift - left, block, key_index, visible, additive, empty,
                bool(empty.any()))


_bands: "collections.OrderedDict" = collections.OrderedDict()
_BAND_CACHE = 8


def cached_band(owner: Optional[Tensor], key: tuple, make) -> Band:
    """make() once per (owner tensor, its version, key): every layer of a forward and backward
    share one band. owner is the mask or cu_seqlens the band was built from (None: key alone)."""
    version = 0 if owner is None or owner.is_inference() else owner._version
    full = (id(owner), version) + key
    hit = _bands.get(full)
    if hit is not None and (owner is None or hit[0]() is owner):  # not a recycled id
        _bands.move_to_end(full)
        return hit[1]
    band = make()
    _bands[full] = ((weakref.ref(owner) if owner is not None else None), band)
    while len(_bands) > _BAND_CACHE:
        _bands.popitem(last=False)
    return band


def _query_blocks(t: Tensor, band: Band, role: str, fill: float = 0.0,
                  turn: Optional[tuple] = None) -> Tensor:
    """(N, Sq, H, D) -> (N * blocks, block, H, D), padded at the end with `fill`; turn:
    (cos, sin, positions (N, Sq)) writes the rows turned by RoPE (the copy is made anyway);
    role: which cpu.scratch buffer (the layouts are read only by the fused call that takes
    them; backward builds its own)."""
    rows = band.blocks * band.block
    blocks = cpu.scratch(role, (band.n, rows, *t.shape[2:]), t)
    if turn is None:
        blocks[:, :band.sq] = t
    else:
        reference.rotary_into(blocks[:, :band.sq], t, *turn)
    if band.sq < rows:
        blocks[:, band.sq:] = fill
    return blocks.view(band.n * band.blocks, band.block, *t.shape[2:])


def _key_spans(t: Tensor, band: Band, role: str, turn: Optional[tuple] = None) -> Tensor:
    """(N, Sk, H, D) -> (N * blocks, span, H, D): the keys each query block can reach, as
    overlapping windows (a strided view) of one zero-padded copy of the keys: each sequence
    padded to blocks * block rows, so block i's span starts i * block rows after block 0's
    across sequences too (rows outside a sequence's keys are masked out by the band), instead
    of gathering span / block copies of every key. turn: as _query_blocks' (positions (N, Sk))."""
    n, sk, h, d = t.shape
    rows = band.blocks * band.block
    if sk > rows:  # more keys than query rows (cross-attention): gather them
        if turn is not None:
            turned = torch.empty_like(t, memory_format=torch.contiguous_format)
            reference.rotary_into(turned, t, *turn)
            t = turned
        flat = t.reshape(n * sk, h, d)
        return flat.index_select(0, band.key_index).view(n * band.blocks, band.span, h, d)
    front = max(0, -band.first)
    back = max(0, (n * band.blocks - 1) * band.block + band.first + band.span - n * rows)
    padded = cpu.scratch(role, (front + n * rows + back, h, d), t)
    # zeros only around the keys (the masked rows must hold finite values)
    if front:
        padded[:front] = 0.0
    if back:
        padded[front + n * rows:] = 0.0
    keys = padded[front:front + n * rows].view(n, rows, h, d)
    if sk < rows:
        keys[:, sk:] = 0.0
    if turn is None:
        keys[:, :sk] = t
    else:
        reference.rotary_into(keys[:, :sk], t, *turn)
    return padded.as_strided((n * band.blocks, band.span, h, d), (band.block * h * d, h * d, d, 1),
                             padded.storage_offset() + (front + band.first) * h * d)


def _lse_blocks(lse: Tensor, band: Band) -> Tensor:
    """(N, H, Sq) -> (N * blocks, H, block), +inf (no key) in the padding rows."""
    h, block = lse.shape[1], band.block
    lse = F.pad(lse, (0, band.blocks * block - band.sq), value=float("inf"))
    return lse.view(band.n, h, band.blocks, block).transpose(1, 2).reshape(-1, h, block)


def _keep(seed: int, band: Band, h: int, dropout_p: float, device) -> Optional[Tensor]:
    if dropout_p == 0.0:
        return None
    return reference.dropout_keep_mask(seed, (band.n * band.blocks, h, band.block, band.span),
                                       dropout_p, device)


def _aten(q: Tensor, dropout_p: float) -> bool:
    """ATen's fused CPU attention serves CPU inputs without dropout (fp64 keeps the reference's
    explicit formulas, as in the dense path)."""
    return (q.device.type == "cpu" and dropout_p == 0.0 and q.dtype != torch.float64
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"))


def forward(q: Tensor, k: Tensor, v: Tensor, band: Band, dropout_p: float, scale: float,
            seed: int, rotary: Optional[tuple] = None) -> Tuple[Tensor, Tensor]:
    """q (N, Sq, H, D), k and v (N, Sk, H, D) -> (out (N, Sq, H, D), lse (N, H, Sq) fp32).
    rotary: (cos, sin, positions_q (N, Sq), positions_k (N, Sk)): q and k come un-rotated and
    are turned as they are copied into the block layout (no apply_rotary pass of their own)."""
    n, sq, h, d = q.shape
    if sq == 0 or band.sk == 0:  # nothing to compute, or no key to see
        return (q.new_zeros(n, sq, h, d),
                torch.full((n, h, sq), float("inf"), dtype=torch.float32, device=q.device))
    turn_q = turn_k = None
    if rotary is not None:
        cos, sin, positions_q, positions_k = rotary
        turn_q, turn_k = (cos, sin, positions_q), (cos, sin, positions_k)
    qb = _query_blocks(q, band, "q", turn=turn_q)
    kb, vb = _key_spans(k, band, "k", turn_k), _key_spans(v, band, "v")
    if _aten(q, dropout_p):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(t.transpose(1, 2) for t in (qb, kb, vb)), attn_mask=band.additive, scale=scale)
        out = out.transpose(1, 2)  # (blocks, block, H, D)
    else:
        out, lse = reference.attention_forward(qb, kb, vb, None, False, dropout_p, scale,
                                               _keep(seed, band, h, dropout_p, q.device),
                                               visible=band.visible)
    out = out.reshape(n, band.blocks * band.block, h, d)[:, :sq]
    lse = lse.view(n, band.blocks, h, band.block).transpose(1, 2).reshape(n, h, -1)[..., :sq]
    if band.has_empty:  # the contract: zeros and lse = +inf for a query that sees no key
        out = out.masked_fill(band.empty.view(n, sq, 1, 1), 0.0)
        lse = lse.masked_fill(band.empty.view(n, 1, sq), float("inf"))
    return out.contiguous(), lse.contiguous()


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             band: Band, dropout_p: float, scale: float,
             seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    n, sq, h, d = q.shape
    if sq == 0 or band.sk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    qb, dob, ob = (_query_blocks(t, band, role) for t, role in ((q, "q"), (dout, "dout"),
                                                                  (out, "out")))
    kb, vb = _key_spans(k, band, "k"), _key_spans(v, band, "v")
    lse_b = _lse_blocks(lse, band)
    if _aten(q, dropout_p):
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(t.transpose(1, 2) for t in (dob, qb, kb, vb, ob)), lse_b.contiguous(), 0.0, False,
            attn_mask=band.additive, scale=scale)
        dq, dk, dv = (g.transpose(1, 2) for g in grads)
    else:
        dq, dk, dv = reference.attention_backward(dob, qb, kb, vb, ob, lse_b, None, False,
                                                  dropout_p, scale,
                                                  _keep(seed, band, h, dropout_p, q.device),
                                                  visible=band.visible)
    dq = dq.reshape(n, band.blocks * band.block, h, d)[:, :sq]

    def add_spans(g: Tensor, like: Tensor) -> Tensor:
        # each key sits in up to (span / block + 1) spans: accumulate in fp32, round once
        acc = torch.zeros(band.n * band.sk, h, d, dtype=reference.acc_dtype(like),
                          device=like.device)
        acc.index_add_(0, band.key_index, g.reshape(-1, h, d).to(acc.dtype))
        return acc.view(like.shape).to(like.dtype)

    return dq.contiguous(), add_spans(dk, k), add_spans(dv, v)
