"""Packing a padded batch into its real tokens and back: the unpadded model's bookkeeping.

    packed = pack_mask(attention_mask)            # once per forward: indices, cu_seqlens, ...
    x = gather_tokens(x_padded, packed.indices)   # (B, S, ...) -> (T, ...), real tokens only
    y = packed.grid(x)                            # (T, ...) -> (B, S, ...), zeros at padding

Both directions are differentiable (index_select / index_copy). T is the number of real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PackedBatch:
    """Where the real tokens of a (batch, seqlen) grid sit, computed once per forward and shared
    by every layer (and by backward, through autograd's saved tensors)."""
    cu_seqlens: Tensor  # (B + 1,) int32: sequence b is packed rows cu[b]:cu[b+1]
    max_seqlen: int  # an upper bound of every length (no host sync needed to know it)
    indices: Optional[Tensor] = None  # (T,) int64 flat index b * seqlen + s of each packed token
    batch: int = 0  # the grid the caller sees: (B, S) padded input, or (1, T) packed input
    seqlen: int = 0

    def rows(self, t: Tensor) -> Tensor:
        """(B, S, ...) in the caller's grid -> (N, ...) the rows the model computed on."""
        if self.indices is None:
            return t.reshape(-1, *t.shape[2:])
        return gather_tokens(t, self.indices)

    def grid(self, t: Tensor) -> Tensor:
        """(N, ...) computed rows -> (B, S, ...) the caller's grid, zeros at padding."""
        if self.indices is None:
            return t.view(self.batch, self.seqlen, *t.shape[1:])
        return scatter_tokens(t, self.indices, self.batch, self.seqlen)


def pack_mask(attention_mask: Tensor, *, refuse_holes: bool = False,
              refuse_left_padding: bool = False, whole_grid: bool = False) -> Optional[PackedBatch]:
    """(B, S) mask, nonzero = real token, any pattern (right or left padding, holes): the tokens of
    row b, in order, become sequence b. One host sync, which answers every question asked of the
    mask (a GPU forward with several would stall the host each time):

    - refuse_holes: None instead where some row's real tokens are not one run ([1, 0, 1]):
      packing closes such gaps, so distances between packed tokens are no longer positions'
      distances, which a sliding window measures. None while torch.compile traces (the answer
      would need a data-dependent guard): the caller then takes the path exact for any mask.
    - refuse_left_padding: None where some row's first token is padding (left padding, a row of
      padding only): heads read position 0 (a pooler, [CLS] pooling), where transformers
      computes a padding token's state and the packed path leaves zeros.
    - whole_grid: a mask with no padding gives the grid itself (indices None, nothing to gather).
    """
    b, s = attention_mask.shape
    real = attention_mask.bool()
    lengths = real.sum(1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    flat = real.flatten()
    tracing = torch.compiler.is_compiling()
    if tracing and (refuse_holes or refuse_left_padding):
        return None
    if tracing or (flat.device.type == "cpu"
                   and not (refuse_holes or refuse_left_padding or whole_grid)):
        # nothing to read: no question asked on the CPU (where nonzero's own sync is free), or
        # none answerable while tracing
        return PackedBatch(cu_seqlens, s, torch.nonzero(flat).flatten(), b, s)
    facts = [cu_seqlens[-1]]
    if refuse_holes:  # runs of real tokens per row
        runs = real[:, :1].sum(1) + (real[:, 1:] & ~real[:, :-1]).sum(1)
        facts.append((runs > 1).any().to(torch.int32))
    if refuse_left_padding and s:
        facts.append((~real[:, 0]).any().to(torch.int32))
    total, *refused = torch.stack(facts).tolist()  # the one host sync
    if any(refused):
        return None
    if whole_grid and total == b * s:
        return PackedBatch(cu_seqlens, s, batch=b, seqlen=s)
    return PackedBatch(cu_seqlens, s, _real_indices(flat, total), b, s)


def _real_indices(flat: Tensor, total: int) -> Tensor:
    """(total,) int64: where a flat mask's `total` real tokens are. Given the count, nonzero_static
    needs no host sync of its own on a GPU; on the CPU, where a sync costs nothing, nonzero is
    faster (27 vs 70 us at 32 x 512)."""
    if flat.device.type == "cpu":
        return torch.nonzero(flat).flatten()
    return torch.nonzero_static(flat, size=total).flatten()


def pack_position_ids(position_ids: Tensor, max_position: int) -> PackedBatch:
    """(1, T) position ids restarting per sequence at the first token's position: 0 as
    transformers' DataCollatorWithFlattening makes them, or RoBERTa's pad_token_id + 1. One host
    sync: the number of sequences."""
    pos = position_ids.reshape(-1)
    first = torch.arange(pos.numel(), device=pos.device) == 0  # a sequence starts at token 0
    starts = torch.nonzero((pos == pos[:1]) | first).flatten().to(torch.int32)
    total = torch.tensor([pos.numel()], dtype=torch.int32, device=pos.device)
    return PackedBatch(torch.cat([starts, total]), min(pos.numel(), max_position),
                       batch=1, seqlen=pos.numel())


def _sequence_and_position(cu_seqlens: Tensor, total: int):
    """(total,) sequence index and (total,) int64 position within it of each packed token, with
    no host sync."""
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)
    return seq, (tokens - cu_seqlens[seq]).long()


def positions_in_sequence(cu_seqlens: Tensor, total: int) -> Tensor:
    """(total,) int64: each packed token's position within its sequence, with no host sync."""
    return _sequence_and_position(cu_seqlens, total)[1]


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """(B, S, ...) -> (T, ...): the packed rows at flat indices."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, indices)


def scatter_tokens(x: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """(T, ...) -> (B, S, ...) at flat indices, zeros where the grid has padding."""
    flat = x.new_zeros(batch * seqlen, *x.shape[1:])
    return flat.index_copy(0, indices, x).view(batch, seqlen, *x.shape[1:])


def first_tokens(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """(T, C) packed -> (B, C): each sequence's first token (the [CLS]); zeros for an empty one."""
    starts = cu_seqlens[:-1].long()
    empty = (cu_seqlens[1:] == cu_seqlens[:-1]).unsqueeze(1)
    padded = torch.cat([x, x.new_zeros(1, *x.shape[1:])])  # an empty last sequence reads row T
    return padded.index_select(0, starts).masked_fill(empty, 0.0)


def mean_tokens(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """(T, C) packed -> (B, C): the mean of each sequence's tokens; zeros for an empty one. No
    host sync."""
    seq = _sequence_and_position(cu_seqlens, x.shape[0])[0]
    sums = x.new_zeros(cu_seqlens.numel() - 1, *x.shape[1:]).index_add(0, seq, x)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=1).to(x.dtype)
    return sums / lengths.view(-1, *([1] * (x.dim() - 1)))


def varlen_to_padded_index(cu_seqlens: Tensor, total: int, max_seqlen: int) -> Tensor:
    """(total,) int64: the flat index b * max_seqlen + s of each packed token, with no host sync
    (for kernels that only take a padded layout)."""
    seq, position = _sequence_and_position(cu_seqlens, total)
    return seq * max_seqlen + position
