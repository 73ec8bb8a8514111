"""How much work each benchmark does: FLOPs (compute-bound ops) and bytes (memory-bound ops).

FLOPs follow the FlashAttention convention so our TFLOP/s line up with published charts: a
multiply-add is 2 FLOPs, attention forward is 4·B·S²·H·D (QKᵀ and PV), backward 2.5× forward,
causal halves it, and with padding only real tokens count (a sequence of length L does L² pairs).
"""
from __future__ import annotations

from typing import Optional, Sequence

# backward / forward cost; "fwd+bwd" is the sum
_MODE_FACTOR_ATTENTION = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
_MODE_FACTOR_GEMM = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}  # backward = dX and dW GEMMs


def attention_flops(batch: int, seqlen: int, heads: int, head_dim: int, *, causal: bool = False,
                    mode: str = "fwd", lengths: Optional[Sequence[int]] = None) -> float:
    """FLOPs of attention over real tokens; `lengths` are the real lengths when padded."""
    if lengths is None:
        pairs = batch * seqlen * seqlen
    else:
        assert len(lengths) == batch, "one length per sequence"
        pairs = sum(int(n) * int(n) for n in lengths)
    if causal:
        pairs /= 2
    return 4.0 * pairs * heads * head_dim * _MODE_FACTOR_ATTENTION[mode]


def linear_flops(rows: int, in_features: int, out_features: int, *, mode: str = "fwd") -> float:
    """FLOPs of x (rows, in) @ W.T (in, out); the bias and GELU epilogue are not counted."""
    return 2.0 * rows * in_features * out_features * _MODE_FACTOR_GEMM[mode]


def add_layer_norm_bytes(rows: int, hidden: int, elem_size: int, *, mode: str = "fwd",
                         param_size: Optional[int] = None) -> float:
    """Bytes at the op's interface, each tensor read or written once.

    forward reads x, residual, weight, bias and writes y and the fp32 mean/rstd (rows each);
    backward reads dy, x, residual, weight, mean, rstd and writes dx, dresidual, dweight, dbias.
    """
    param_size = elem_size if param_size is None else param_size
    act = rows * hidden * elem_size
    params = hidden * param_size
    stats = 2 * rows * 4
    fwd = 3 * act + 2 * params + stats
    bwd = 5 * act + 3 * params + stats
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def bert_flops(lengths: Sequence[int], *, layers: int, hidden: int, intermediate: int,
               mode: str = "fwd") -> float:
    """Encoder FLOPs on real tokens only (embeddings and pooler are negligible and not counted).

    Per layer: QKV + output projections 4·h² and the FFN 2·h·ffn multiply-adds per token, plus
    attention 4·L²·h per sequence (FlashAttention convention).
    """
    tokens = sum(int(n) for n in lengths)
    dense = 2.0 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate)
    attn = attention_flops(len(lengths), 0, 1, hidden, lengths=lengths)
    per_layer = dense * _MODE_FACTOR_GEMM[mode] + attn * _MODE_FACTOR_ATTENTION[mode]
    return layers * per_layer


def copy_bytes(numel: int, elem_size: int) -> float:
    """A device-to-device copy reads and writes every element once."""
    return 2.0 * numel * elem_size
