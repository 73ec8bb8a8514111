"""Whole-model cases: a training step (forward + backward) and an inference forward of BERT.

Providers: transformers' BertModel with eager and sdpa attention, torch.compile of the sdpa model,
fastbert's own BertModel (default backend choice, and all-Triton), and transformers' model with
`fastbert.patch_hf` (default backend choice). All
start from the same weights, run in the same dtype (bf16 on GPU, fp32 on CPU), in train mode with
BERT's dropout for the training step and in eval mode under inference_mode for inference.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List

import torch

from benchmarks import counting
from benchmarks.harness import Case, Skipped, rotate
from benchmarks.providers import require_fastbert
from benchmarks.suite import MODELS, lengths_to_mask, padded_lengths


@functools.lru_cache(maxsize=1)
def _reference_weights(model: str, device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """One set of weights per model size, shared by every provider."""
    import transformers
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.BertModel(transformers.BertConfig(**MODELS[model]))
    return {k: v.detach().to(dtype) for k, v in hf.state_dict().items()}


def _hf_model(model, device, dtype, attn_implementation):
    import transformers
    config = transformers.BertConfig(**MODELS[model], attn_implementation=attn_implementation)
    with torch.device(device):
        hf = transformers.BertModel(config).to(dtype)
    hf.load_state_dict(_reference_weights(model, device, dtype))
    return hf


def _fastbert_model(model, device, dtype, unpad=True):
    import fastbert
    with torch.device(device):
        fb = fastbert.BertModel(fastbert.BertConfig(**MODELS[model], unpad=unpad)).to(dtype)
    fb.load_state_dict(_reference_weights(model, device, dtype))
    return fb


def _step(model: torch.nn.Module, mode: str, backend: str | None, ids, mask, dout):
    if backend is not None:
        import fastbert
        fastbert.set_backend(backend)  # fixed per call: providers are interleaved
    if mode == "infer":
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.zero_grad(set_to_none=True)  # as an optimizer step would, so grads never accumulate
    model(input_ids=ids, attention_mask=mask).last_hidden_state.backward(dout)


def model_case(device: torch.device, cfg: dict, model: str, batch: int, seqlen: int,
               mode: str) -> Case:
    dtype = cfg["dtype"]
    hidden, vocab = MODELS[model]["hidden_size"], MODELS[model].get("vocab_size", 30522)
    g = torch.Generator().manual_seed(batch * 1000 + seqlen)
    lengths = padded_lengths(batch, seqlen, g)
    mask = lengths_to_mask(lengths, seqlen, device).long()  # the HF attention_mask convention

    def inputs():
        sets = []
        for _ in range(cfg["rotations"]):
            ids = torch.randint(1, vocab, (batch, seqlen), generator=g).to(device) * mask
            dout = torch.randn(batch, seqlen, hidden, generator=g).to(device, dtype)
            sets.append((ids, mask, dout))
        return sets

    def provider(build: Callable[[], torch.nn.Module], backend: str | None = None):
        def setup():
            net = build()
            net.train(mode == "train")
            return rotate([functools.partial(_step, net, mode, backend, *s) for s in inputs()])
        return setup

    def compiled_sdpa():
        if not cfg["compile"]:
            raise Skipped("torch.compile is off for this run (off by default on CPU, where "
                          "compiling takes minutes; pass --compile)")
        return torch.compile(_hf_model(model, device, dtype, "sdpa"))

    def fastbert_model(backend, unpad=True):
        require_fastbert(backend)
        return _fastbert_model(model, device, dtype, unpad)

    def onnxruntime():
        from benchmarks.providers import onnxruntime_bert
        return onnxruntime_bert(_hf_model(model, device, dtype, "eager"))

    def patched():
        import fastbert
        return fastbert.patch_hf(_hf_model(model, device, dtype, "sdpa"))

    providers = {
        "transformers-eager": provider(lambda: _hf_model(model, device, dtype, "eager")),
        "transformers-sdpa": provider(lambda: _hf_model(model, device, dtype, "sdpa")),
        "transformers-sdpa+compile": provider(compiled_sdpa),
    }
    # "auto" is what a user gets by default (the CUDA kernels where they serve the input, Triton
    # elsewhere); "triton" pins everything to the Triton kernels
    # fastbert runs unpadded (real tokens only); "-padded" is the same model computing on padding
    for b in (["auto", "triton"] if device.type == "cuda" else ["torch"]):
        providers[f"fastbert-{b}"] = provider(functools.partial(fastbert_model, b), backend=b)
        providers[f"fastbert-{b}-padded"] = provider(
            functools.partial(fastbert_model, b, unpad=False), backend=b)
    providers["patch_hf"] = provider(patched, backend="auto")
    if device.type == "cpu" and mode == "infer":
        providers["onnxruntime"] = provider(onnxruntime)

    layers = MODELS[model]
    flops = counting.bert_flops(lengths, layers=layers["num_hidden_layers"], hidden=hidden,
                                intermediate=layers["intermediate_size"],
                                mode="fwd" if mode == "infer" else "fwd+bwd")
    padding = 1.0 - sum(lengths) / (batch * seqlen)
    return Case("model", mode, f"{model} B{batch} S{seqlen}", providers,
                work={"flops": flops, "tokens": float(sum(lengths))},
                params=dict(model=model, seqlen=seqlen, padding=round(padding, 3)),
                measure_memory=True,
                gpu_rep_scale=8.0)  # a BERT step takes 10-100 ms: enough calls per round


def model_cases(device: torch.device, cfg: dict) -> List[Case]:
    return [model_case(device, cfg, model, batch, seqlen, mode)
            for model, batch, seqlen, modes in cfg["models"] for mode in modes]
