"""ModernBERT cases (issue 20): transformers' ModernBertModel against the same model patched by
`fastbert.patch_hf`, a training step (forward + backward) and an inference forward.

transformers without flash-attn runs ModernBERT padded with sdpa: every layer computes on the
padding, and its local layers apply a dense S x S sliding-window mask. The patched model runs the
real tokens only, its local layers windowed in O(S * window) (fastbert/window.py on CPU). On a
GPU with flash-attn installed, transformers' flash_attention_2 (unpadded, windowed) is timed too.
Inference is also timed against `gemm-floor`, the patched forward's GEMMs alone, and on a CPU
with native bf16 dot products with `fastbert.cpu.set_bf16(True)` (`patch_hf-bf16-gemms`: fp32
activations, bf16 GEMMs with fp32 accumulation; opt-in, its results are not fp32's), and with
`fastbert.cpu.PREPACK_FP32 = True` (`patch_hf-prepacked`: fp32 weights cached in oneDNN's layout;
opt-in, fp32 results), and with fastbert's CPU attention kernel switched off
(`patch_hf-aten-attention`: ATen's fused attention, as before the kernel; an ablation).
Shapes from benchmarks/suite.py's MODELS (e.g. "modernbert-base-3l": ModernBERT-base layers, one
global and two local with window 128), the same weights for every provider, fp32 on CPU.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import List

import torch

from benchmarks.harness import Case, Skipped, Unsupported, rotate
from benchmarks.models import _hf_model, _step
from benchmarks.suite import MODELS, lengths_to_mask, padded_lengths


def modernbert_case(device: torch.device, cfg: dict, model: str, batch: int, seqlen: int,
                    mode: str) -> Case:
    dtype = cfg["dtype"]
    shape = MODELS[model]
    g = torch.Generator().manual_seed(batch * 1000 + seqlen)
    lengths = padded_lengths(batch, seqlen, g)  # 40-100 % real tokens
    mask = lengths_to_mask(lengths, seqlen, device).long()

    def inputs():
        sets = []
        for _ in range(cfg["rotations"]):
            ids = torch.randint(0, shape["pad_token_id"], (batch, seqlen), generator=g).to(device)
            ids = ids.masked_fill(~mask.bool(), shape["pad_token_id"])
            dout = torch.randn(batch, seqlen, shape["hidden_size"], generator=g).to(device, dtype)
            sets.append((ids, mask, dout))
        return sets

    def provider(build, backend=None):
        def setup():
            net = build()
            net.train(mode == "train")
            return rotate([functools.partial(_step, net, mode, backend, *s) for s in inputs()])
        return setup

    def flash_attention():
        if device.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
            raise Skipped("flash-attn is not installed (GPU only)")
        return _hf_model(model, device, dtype, "flash_attention_2")

    def patched():
        import fastbert
        return fastbert.patch_hf(_hf_model(model, device, dtype, "sdpa"))

    def patched_with(switch):
        """patch_hf with a process-wide switch (switch(True) on, switch(False) back) flipped
        around each call only, as a backend choice would be: providers are interleaved."""
        step = provider(patched, backend="auto")()

        def call():
            switch(True)
            try:
                return step()
            finally:
                switch(False)
        return call

    def patched_bf16_gemms():
        from fastbert import cpu
        if mode != "infer" or device.type != "cpu":
            raise Unsupported("bf16 GEMMs under fp32 are fastbert's CPU inference mode")
        native, why = cpu.bf16_support()
        if not native:
            raise Unsupported(f"bf16 GEMMs on this CPU would be emulated: {why}")
        return patched_with(cpu.set_bf16)

    def patched_prepacked():
        from fastbert import cpu
        if mode != "infer" or device.type != "cpu":
            raise Unsupported("prepacked fp32 weights are an opt-in of fastbert's CPU inference")
        return patched_with(lambda on: setattr(cpu, "PREPACK_FP32", on))

    def patched_aten_attention():
        from fastbert import cpu_attention
        if device.type != "cpu":
            raise Unsupported("fastbert's attention kernel switched off is a CPU ablation")
        if cpu_attention.reason() is not None:
            raise Unsupported(cpu_attention.reason())
        return patched_with(lambda off: cpu_attention.set_enabled(not off))

    def gemm_floor():
        if mode != "infer":
            raise Skipped("the GEMM floor is timed for inference only")
        return _gemm_floor(_hf_model(model, device, dtype, "sdpa"), sum(lengths), device, dtype)

    providers = {
        "transformers-sdpa": provider(lambda: _hf_model(model, device, dtype, "sdpa")),
        "transformers-flash_attention_2": provider(flash_attention),
        "patch_hf": provider(patched, backend="auto"),
        "patch_hf-prepacked": patched_prepacked,
        "patch_hf-bf16-gemms": patched_bf16_gemms,
        "patch_hf-aten-attention": patched_aten_attention,
        "gemm-floor": gemm_floor,
    }
    padding = 1.0 - sum(lengths) / (batch * seqlen)
    return Case("model", mode, f"{model} B{batch} S{seqlen}", providers,
                work={"tokens": float(sum(lengths))},
                params=dict(model=model, seqlen=seqlen, padding=round(padding, 3)),
                measure_memory=True, gpu_rep_scale=8.0)


def _gemm_floor(hf: torch.nn.Module, tokens: int, device: torch.device, dtype: torch.dtype):
    """The patched forward's projections alone (Wqkv, Wo, Wi, the MLP's Wo of every layer) on
    `tokens` rows, through the route the patched model takes (fastbert.cpu's oneDNN GEMM on CPU,
    F.linear on GPU): no attention, norm, RoPE or activation. A lower bound on patch_hf's
    inference time on this device, so speedup_vs:gemm-floor says how much of it is left above
    the GEMMs, and transformers-sdpa / gemm-floor bounds what any speedup over sdpa can be."""
    import torch.nn.functional as F
    from fastbert import cpu
    linears = [m for layer in hf.layers for m in (layer.attn.Wqkv, layer.attn.Wo, layer.mlp.Wi,
                                                  layer.mlp.Wo)]
    g = torch.Generator().manual_seed(tokens)
    inputs = [torch.randn(tokens, m.in_features, generator=g).to(device, dtype) for m in linears]

    def forward():
        with torch.inference_mode():
            for m, x in zip(linears, inputs):
                w, b = m.weight, m.bias
                y = cpu.linear(x, w, b) if cpu.should_use(x, w, b) else F.linear(x, w, b)
        return y
    return forward


def modernbert_cases(device: torch.device, cfg: dict) -> List[Case]:
    return [modernbert_case(device, cfg, model, batch, seqlen, mode)
            for model, batch, seqlen, modes in cfg.get("modernbert", []) for mode in modes]
