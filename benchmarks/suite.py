"""What the suite measures: shapes per device and preset, and the cases built from them.

Presets: "full" (every shape in issue 5), "quick" (the headline shapes, a few minutes), "tiny"
(seconds; the tests use it). GPU runs in bf16 at BERT's real sizes; CPU runs fp32 at small sizes,
where the only fastbert backend is the torch one.
"""
from __future__ import annotations

import functools
import zlib
from typing import Dict, List

import torch

from benchmarks import counting, providers as P
from benchmarks.harness import Case

# BERT sizes (DESIGN §1); "mini" is a 4-layer hidden-256 BERT that runs quickly on a CPU
MODELS = {
    "bert-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                      intermediate_size=3072),
    "bert-large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                       intermediate_size=4096),
    # BERT-base layers, two of them: the CPU acceptance shape of the unpadded and CPU issues
    "bert-base-2l": dict(num_hidden_layers=2, hidden_size=768, num_attention_heads=12,
                         intermediate_size=3072),
    "bert-mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                      intermediate_size=1024),
    "bert-tiny": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                      intermediate_size=64, vocab_size=128, max_position_embeddings=64),
}
# RoBERTa-base (issue 15): BERT-base layers with RoBERTa's vocabulary, positions after the padding
# index and one segment; "-2l" its first two layers, the CPU shape
_ROBERTA = dict(model_type="roberta", hidden_size=768, num_attention_heads=12,
                intermediate_size=3072, vocab_size=50265, max_position_embeddings=514,
                type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
MODELS.update({"roberta-base": dict(_ROBERTA, num_hidden_layers=12),
               "roberta-base-2l": dict(_ROBERTA, num_hidden_layers=2)})
# ModernBERT-base (issue 20): every third layer global, the others local with a 128-token window;
# "-3l" one global and two local layers, the CPU shape (benchmarks/modernbert.py)
_MODERNBERT = dict(model_type="modernbert", hidden_size=768, num_attention_heads=12,
                   intermediate_size=1152, vocab_size=50368, pad_token_id=50283,
                   local_attention=128, global_attn_every_n_layers=3)
MODELS.update({"modernbert-base": dict(_MODERNBERT, num_hidden_layers=22),
               "modernbert-base-3l": dict(_MODERNBERT, num_hidden_layers=3),
               "modernbert-tiny": dict(_MODERNBERT, num_hidden_layers=3, hidden_size=32,
                                       num_attention_heads=2, intermediate_size=48,
                                       local_attention=8)})


BOTH = ["train", "infer"]


def sizes(device: torch.device, preset: str, sweeps: bool = False) -> dict:
    """Shapes and settings for one run. Attention entries are (B, S, H, D, variant). On a CPU the
    quick run leaves the sequence-length sweeps out unless `sweeps` (the full run has them)."""
    if preset == "tiny":  # a smoke test of every code path; bf16 on GPU (the CUDA kernels' dtypes)
        return dict(
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, rotations=2,
            compile=False,
            attention_modes=["fwd+bwd"],
            attention=[(2, 32, 2, 32, "mask")],
            sweep=[(64 // s, s, 2, 32, "none") for s in (16, 32)],
            layer_norm=[(64, 32)], linear_gelu=[(64, 32, 64)], op_modes=["fwd+bwd"],
            models=[("bert-tiny", 2, 16, BOTH)], pretraining=[("bert-tiny", 2, 16)],
            modernbert=[("modernbert-tiny", 2, 16, BOTH)],
            gemm=(128, 128, 128), copy_numel=2 ** 16,
        )
    if device.type == "cuda":
        sweep_s = [512, 2048, 8192] if preset == "quick" else [512, 1024, 2048, 4096, 8192, 16384]
        bert = [(32, 512, 12, 64, "none"), (32, 512, 12, 64, "mask"), (32, 512, 12, 64, "causal"),
                (128, 128, 12, 64, "mask")]
        if preset == "full":
            bert += [(128, 128, 12, 64, "none"), (32, 512, 16, 64, "none"),
                     (32, 512, 16, 64, "mask")]
        return dict(
            dtype=torch.bfloat16, rotations=3, compile=True,
            attention_modes=["fwd", "bwd", "fwd+bwd"],
            attention=bert,
            # FlashAttention's published sweep: 16k tokens per step, hidden 2048
            sweep=[(16384 // s, s, 2048 // d, d, variant) for d in (64, 128) for s in sweep_s
                   for variant in (("none",) if preset == "quick" else ("none", "causal"))],
            layer_norm=[(16384, 768), (16384, 1024)] if preset == "quick" else
            [(rows, c) for rows in (16384, 65536) for c in (768, 1024, 4096)],
            linear_gelu=[(16384, 768, 3072), (16384, 1024, 4096)],
            op_modes=["fwd", "fwd+bwd"],
            # (model, B, S, modes): 16k tokens per step at S=128 and S=512
            models=[("bert-base", 32, 512, BOTH)] if preset == "quick" else
            [(m, b, s, BOTH) for m in ("bert-base", "bert-large") for b, s in ((128, 128), (32, 512))]
            + [("roberta-base", 32, 512, BOTH)],
            pretraining=[("bert-base", 32, 512)],
            modernbert=[("modernbert-base", 32, 512, BOTH)],
            gemm=(8192, 8192, 8192), copy_numel=2 ** 28,
        )
    sweeps = sweeps or preset == "full"
    return dict(
        dtype=torch.float32, rotations=2, compile=False,
        attention_modes=["fwd", "fwd+bwd"] if preset == "quick" else ["fwd", "bwd", "fwd+bwd"],
        attention=[(8, 128, 4, 64, "none"), (8, 128, 4, 64, "mask"), (8, 128, 4, 64, "causal")],
        sweep=[(2048 // s, s, 4, 64, "none") for s in (128, 256, 512)] if sweeps else [],
        layer_norm=[(4096, 256), (4096, 768)],
        linear_gelu=[(2048, 256, 1024), (1024, 768, 3072)],
        op_modes=["fwd", "fwd+bwd"],
        # BERT-base training takes ~10 s a step on one core: only in the full run
        models=[("bert-base-2l", 8, 128, BOTH)]
        + [("bert-mini", 8, s, BOTH) for s in ((64, 128, 256) if sweeps else (128,))]
        + [("bert-base", 8, 128, ["infer"] if preset == "quick" else BOTH)]
        + [("roberta-base-2l", 8, 128, ["infer"] if preset == "quick" else BOTH)],
        pretraining=[("bert-base-2l", 8, 128)],
        modernbert=[("modernbert-base-3l", 8, 512, BOTH)],
        gemm=(1024, 1024, 1024), copy_numel=2 ** 24,
    )


def fastbert_backends(device: torch.device) -> List[str]:
    # on CPU only the torch backend runs; triton and cuda are listed so their reason is recorded
    return ["triton", "cuda"] if device.type == "cuda" else ["torch", "triton", "cuda"]


def padded_lengths(batch: int, seqlen: int, generator: torch.Generator) -> List[int]:
    """Real lengths uniform in 40..100 % of S (real batches carry 20-60 % padding)."""
    low = max(1, (2 * seqlen) // 5)
    return torch.randint(low, seqlen + 1, (batch,), generator=generator).tolist()


def lengths_to_mask(lengths: List[int], seqlen: int, device) -> torch.Tensor:
    return (torch.arange(seqlen).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(device)


def _randn(shape, dtype, device, generator, requires_grad=False):
    t = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


# --------------------------------------------------------------------------------------------
# ceilings
# --------------------------------------------------------------------------------------------

def ceiling_cases(device: torch.device, cfg: dict) -> List[Case]:
    dtype = cfg["dtype"]
    m, n, k = cfg["gemm"]

    def gemm():
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        return lambda: a @ b

    def copy():
        src = torch.randn(cfg["copy_numel"], device=device, dtype=dtype)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    name = str(dtype).replace("torch.", "")
    elem = torch.finfo(dtype).bits // 8
    return [
        Case("ceiling", "gemm", f"{name} {m}x{k} @ {k}x{n}", {"torch.matmul": gemm},
             work={"flops": 2.0 * m * n * k}),
        Case("ceiling", "copy", f"{name} {cfg['copy_numel'] * elem / 2 ** 20:g} MiB",
             {"tensor.copy_": copy}, work={"bytes": counting.copy_bytes(cfg["copy_numel"], elem)}),
    ]


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------

def attention_case(device, cfg, batch, seqlen, heads, head_dim, variant, mode, sweep=False) -> Case:
    dtype, causal, masked = cfg["dtype"], variant == "causal", variant == "mask"
    g = torch.Generator().manual_seed(zlib.crc32(f"{batch},{seqlen},{heads},{head_dim},{variant}"
                                                 .encode()))
    lengths = padded_lengths(batch, seqlen, g) if masked else None
    grad = mode != "fwd"

    def inputs():
        sets = []
        for _ in range(cfg["rotations"]):
            q, k, v = (_randn((batch, seqlen, heads, head_dim), dtype, device, g, grad)
                       for _ in range(3))
            mask = lengths_to_mask(lengths, seqlen, device) if masked else None
            sets.append(((q, k, v, mask), _randn((batch, seqlen, heads, head_dim), dtype, device, g)))
        return sets

    def provider(make_forward, guard=False):
        def setup():
            if guard:
                P.guard_score_memory(batch, heads, seqlen, torch.finfo(dtype).bits // 8, mode,
                                     cfg["rotations"], device)
            return P.timed(make_forward(), inputs(), mode)
        return setup

    from torch.nn.attention import SDPBackend
    providers = {f"fastbert-{b}": provider(functools.partial(P.attention_fastbert, b, causal))
                 for b in fastbert_backends(device)}
    sdpa = [("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)]
    if device.type == "cuda":  # cuDNN and memory-efficient attention exist only there
        sdpa[1:1] = [("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    for label, backend in sdpa:
        providers[f"sdpa-{label}"] = provider(functools.partial(P.attention_sdpa, backend, causal),
                                              guard=label == "math")
    providers["torch-eager"] = provider(functools.partial(P.attention_eager, causal), guard=True)
    if masked:  # the same real tokens packed: fastbert.attention_varlen (and FlashAttention's)
        def packed_inputs():
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                              device=device)
            shape_packed = (sum(lengths), heads, head_dim)
            return [((*(_randn(shape_packed, dtype, device, g, grad) for _ in range(3)), cu,
                      seqlen), _randn(shape_packed, dtype, device, g))
                    for _ in range(cfg["rotations"])]

        def varlen_provider(make_forward):
            return lambda: P.timed(make_forward(), packed_inputs(), mode)

        for b in fastbert_backends(device):
            providers[f"fastbert-varlen-{b}"] = varlen_provider(
                functools.partial(P.attention_varlen_fastbert, b, causal))
        providers["flash_attn-varlen"] = varlen_provider(
            functools.partial(P.attention_varlen_flash_attn, causal))

    shape = f"B{batch} S{seqlen} H{heads} D{head_dim}" + ("" if variant == "none" else f" {variant}")
    flops = counting.attention_flops(batch, seqlen, heads, head_dim, causal=causal, mode=mode,
                                     lengths=lengths)
    return Case("attention", mode, shape, providers, work={"flops": flops},
                params=dict(seqlen=seqlen, head_dim=head_dim, variant=variant, sweep=sweep))


def add_layer_norm_case(device, cfg, rows, hidden, mode) -> Case:
    dtype, eps, grad = cfg["dtype"], 1e-12, mode != "fwd"
    g = torch.Generator().manual_seed(rows * 7 + hidden)

    def inputs():
        sets = []
        for _ in range(cfg["rotations"]):
            x, r = (_randn((rows, hidden), dtype, device, g, grad) for _ in range(2))
            w = (1 + 0.1 * _randn((hidden,), dtype, device, g)).requires_grad_(grad)
            b = _randn((hidden,), dtype, device, g, grad)
            sets.append(((x, r, w, b), _randn((rows, hidden), dtype, device, g)))
        return sets

    def provider(make_forward):
        return lambda: P.timed(make_forward(), inputs(), mode)

    providers = {f"fastbert-{b}": provider(functools.partial(P.add_layer_norm_fastbert, b, eps))
                 for b in fastbert_backends(device)}
    providers["torch-eager"] = provider(functools.partial(P.add_layer_norm_eager, eps))
    providers["torch-compile"] = provider(lambda: P.compiled(P.add_layer_norm_eager(eps),
                                                             cfg["compile"], _NO_COMPILE))
    elem = torch.finfo(dtype).bits // 8
    return Case("add_layer_norm", mode, f"{rows}x{hidden}", providers,
                work={"bytes": counting.add_layer_norm_bytes(rows, hidden, elem, mode=mode)},
                params=dict(rows=rows, hidden=hidden))


def linear_gelu_case(device, cfg, rows, k, n, mode) -> Case:
    dtype, grad = cfg["dtype"], mode != "fwd"
    g = torch.Generator().manual_seed(rows + 3 * k + 5 * n)

    def inputs():
        sets = []
        for _ in range(cfg["rotations"]):
            x = _randn((rows, k), dtype, device, g, grad)
            w = (_randn((n, k), dtype, device, g) * k ** -0.5).requires_grad_(grad)
            b = _randn((n,), dtype, device, g, grad)
            sets.append(((x, w, b), _randn((rows, n), dtype, device, g)))
        return sets

    def provider(make_forward):
        return lambda: P.timed(make_forward(), inputs(), mode)

    providers = {f"fastbert-{b}": provider(functools.partial(P.linear_bias_gelu_fastbert, b))
                 for b in fastbert_backends(device)}
    providers["torch-eager"] = provider(P.linear_bias_gelu_eager)
    providers["torch-compile"] = provider(lambda: P.compiled(P.linear_bias_gelu_eager(),
                                                             cfg["compile"], _NO_COMPILE))
    providers["gemm-only"] = provider(P.gemm_only)
    return Case("linear_bias_gelu", mode, f"{rows}x{k}->{n}", providers,
                work={"flops": counting.linear_flops(rows, k, n, mode=mode)},
                params=dict(rows=rows, k=k, n=n))


_NO_COMPILE = ("torch.compile is off for this run (off by default on CPU, where compiling takes "
               "minutes; pass --compile)")


def op_cases(device: torch.device, cfg: dict) -> Dict[str, List[Case]]:
    """Cases by group; the caller orders the groups (headline shapes before the long sweep)."""
    return {
        "attention": [attention_case(device, cfg, *shape, mode) for shape in cfg["attention"]
                      for mode in cfg["attention_modes"]],
        "add_layer_norm": [add_layer_norm_case(device, cfg, rows, c, mode)
                           for rows, c in cfg["layer_norm"] for mode in cfg["op_modes"]],
        "linear_bias_gelu": [linear_gelu_case(device, cfg, *shape, mode)
                             for shape in cfg["linear_gelu"] for mode in cfg["op_modes"]],
        "attention_sweep": [attention_case(device, cfg, *shape, mode, sweep=True)
                            for shape in cfg["sweep"] for mode in cfg["attention_modes"]],
    }
