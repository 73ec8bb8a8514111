"""RoPE applied to a tile as it is loaded: the attention forward's ROTARY_HALF variant
(fastbert/triton/attention_kernels.py) turns its query tile once and each key tile as it arrives,
so q and k are read un-rotated straight from the QKV projection and the separate apply_rotary
pass (a read and a write of every q and k element) is never made.

Non-interleaved (GPT-NeoX "rotate_half", ModernBERT's) pairs (c, c + HALF) for c < HALF:
    out[c] = x[c] cos - x[c + HALF] sin,   out[c + HALF] = x[c + HALF] cos + x[c] sin
at each row's position (its index into the (positions, HALF) tables); columns >= 2 * HALF pass
through. The partner columns come from a second load of the same rows with the halves swapped
(the same cache lines), the math runs in fp32 and the result is cast back to x's dtype before any
dot, as fastbert.apply_rotary writes it.
"""
import triton
import triton.language as tl


@triton.jit
def rope_tile(x, row_ptrs, cols, mask, Cos, Sin, positions, HALF: tl.constexpr):
    """x (rows, cols) loaded from row_ptrs (rows, 1) + cols (1-D) under mask, turned by RoPE at
    `positions` (rows,). Cos, Sin: contiguous (n_positions, HALF) tables."""
    first = cols < HALF
    turned = cols < 2 * HALF
    partner = tl.where(first, cols + HALF, cols - HALF)
    freq = tl.where(first, cols, cols - HALF)
    turn = mask & turned[None, :]
    x_partner = tl.load(row_ptrs + partner[None, :], mask=turn, other=0.0)
    table = positions[:, None].to(tl.int64) * HALF + freq[None, :]
    cos = tl.load(Cos + table, mask=turn, other=1.0).to(tl.float32)
    sin = tl.load(Sin + table, mask=turn, other=0.0).to(tl.float32)
    sin = tl.where(first[None, :], -sin, sin)  # the first half subtracts its partner's share
    return (x.to(tl.float32) * cos + x_partner.to(tl.float32) * sin).to(x.dtype)
