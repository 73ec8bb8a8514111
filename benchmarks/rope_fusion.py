"""RoPE inside the attention forward, or an apply_rotary pass first: which is faster, per layer
kind (issue 20). ModernBERT's layers choose by `fastbert.varlen.rotary_pays_in_kernel`, today
from static instruction counts only (the fused forward turns every key tile again for each query
tile); this times both on the GPU so the choice can rest on a measurement.

Per case, ModernBERT-base heads (H=12, D=64) over 8 packed sequences, bf16, Triton backend:
  unfused: q, k = apply_rotary(qk) (one call over q and k, as the layers make it); attention_varlen
  fused:   attention_varlen(q, k, v, ..., rotary=(cos, sin), rotary_seqlen_offsets=...)
for a global layer and a local one (window +-64), at 512 and 2048 tokens per sequence.

    python -m benchmarks.rope_fusion            # on a GPU (scripts/gpu_check.sh runs it)
"""
from __future__ import annotations

import sys

import torch

import fastbert

HEADS, HEAD_DIM, SEQUENCES = 12, 64, 8
WINDOWS = {"global": (-1, -1), "local +-64": (64, 64)}


def make_inputs(seqlen: int, device, dtype=torch.bfloat16, heads=HEADS, head_dim=HEAD_DIM,
                sequences=SEQUENCES, seed=0):
    """Packed (T, 3, H, D) projections of `sequences` sequences of `seqlen` tokens, and RoPE
    tables (seqlen, D / 2) as ModernBERT's (theta 10000)."""
    g = torch.Generator().manual_seed(seed)
    total = seqlen * sequences
    qkv = torch.randn(total, 3, heads, head_dim, generator=g).to(device, dtype)
    cu = torch.arange(0, total + 1, seqlen, dtype=torch.int32, device=device)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(seqlen, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return qkv, cu, angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def variants(qkv, cu, cos, sin, seqlen: int, window, backend="triton"):
    """{"unfused": call, "fused": call}: the two ways a layer runs RoPE + attention."""
    total, _, heads, head_dim = qkv.shape
    qk, v = qkv[:, :2], qkv[:, 2]

    def unfused():
        turned = fastbert.apply_rotary(qk.reshape(total, 2 * heads, head_dim), cos, sin,
                                       cu_seqlens=cu, max_seqlen=seqlen, backend=backend)
        q, k = turned.view(total, 2, heads, head_dim).unbind(1)
        return fastbert.attention_varlen(q, k, v, cu, cu, seqlen, seqlen, window_size=window,
                                         backend=backend)

    def fused():
        return fastbert.attention_varlen(qk[:, 0], qk[:, 1], v, cu, cu, seqlen, seqlen,
                                         window_size=window, rotary=(cos, sin), backend=backend)
    return {"unfused": unfused, "fused": fused}


def main() -> int:
    if not torch.cuda.is_available():
        print("rope_fusion: needs a CUDA GPU (the fused forward is a Triton kernel)")
        return 0
    import triton.testing
    print(f"{torch.cuda.get_device_name()}, bf16, H={HEADS} D={HEAD_DIM}, {SEQUENCES} sequences")
    print(f"{'layer':12s} {'tokens/seq':>10s} {'unfused ms':>11s} {'fused ms':>9s} {'fused speedup':>14s}")
    with torch.inference_mode():
        for seqlen in (512, 2048):
            qkv, cu, cos, sin = make_inputs(seqlen, "cuda")
            for name, window in WINDOWS.items():
                calls = variants(qkv, cu, cos, sin, seqlen, window)
                ms = {k: triton.testing.do_bench(f, warmup=10, rep=50) for k, f in calls.items()}
                print(f"{name:12s} {seqlen:10d} {ms['unfused']:11.3f} {ms['fused']:9.3f} "
                      f"{ms['unfused'] / ms['fused']:13.2f}x")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
