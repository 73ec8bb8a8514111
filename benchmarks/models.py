"""Whole-model cases: a training step (forward + backward) and an inference forward of BERT.

Models: BERT sizes and RoBERTa-base (transformers' RobertaModel against fastbert's BertModel with
model_type "roberta"), from benchmarks/suite.py's MODELS.
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


def _hf_config(model: str, **extra):
    """transformers' config of a MODELS entry: BertConfig, or the family's (RobertaConfig, ...)."""
    import transformers
    fields = dict(MODELS[model])
    return transformers.AutoConfig.for_model(fields.pop("model_type", "bert"), **fields, **extra)


@functools.lru_cache(maxsize=1)
def _reference_weights(model: str, device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """One set of weights per model size, shared by every provider."""
    import transformers
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.AutoModel.from_config(_hf_config(model))
    return {k: v.detach().to(dtype) for k, v in hf.state_dict().items()}


def _hf_model(model, device, dtype, attn_implementation):
    import transformers
    config = _hf_config(model, attn_implementation=attn_implementation)
    with torch.device(device):
        hf = transformers.AutoModel.from_config(config).to(dtype)
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
    pad = MODELS[model].get("pad_token_id", 0)
    g = torch.Generator().manual_seed(batch * 1000 + seqlen)
    lengths = padded_lengths(batch, seqlen, g)
    mask = lengths_to_mask(lengths, seqlen, device).long()  # the HF attention_mask convention

    def inputs():
        sets = []
        for _ in range(cfg["rotations"]):
            ids = torch.randint(pad + 1, vocab, (batch, seqlen), generator=g).to(device)
            ids = ids.masked_fill(~mask.bool(), pad)  # the tokenizer's padding id
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


def _pretraining_model(library: str, model, device, dtype):
    import transformers

    import fastbert
    lib = transformers if library == "transformers" else fastbert
    extra = dict(attn_implementation="sdpa") if library == "transformers" else {}
    with torch.device(device):
        net = lib.BertForPreTraining(lib.BertConfig(**MODELS[model], **extra)).to(dtype)
    torch.manual_seed(0)  # the same weights for both libraries
    state = {k: torch.randn_like(v) * 0.02 for k, v in net.state_dict().items()}
    net.load_state_dict(state, strict=False)
    return net.train()


def pretraining_case(device: torch.device, cfg: dict, model: str, batch: int, seqlen: int) -> Case:
    """One BertForPreTraining training step (MLM + NSP loss, backward), 15 % of the real tokens
    masked: transformers computes the 30k-way decoder at every position, fastbert
    (return_logits=False) only at the masked ones, on real tokens only."""
    dtype = cfg["dtype"]
    vocab = MODELS[model].get("vocab_size", 30522)
    g = torch.Generator().manual_seed(7 * batch + seqlen)
    lengths = padded_lengths(batch, seqlen, g)
    mask = lengths_to_mask(lengths, seqlen, device).long()

    def inputs():
        sets = []
        for _ in range(cfg["rotations"]):
            ids = torch.randint(1, vocab, (batch, seqlen), generator=g).to(device) * mask
            chosen = (torch.rand(batch, seqlen, generator=g).to(device) < 0.15) & mask.bool()
            labels = ids.masked_fill(~chosen, -100)
            nsp = torch.randint(0, 2, (batch,), generator=g).to(device)
            sets.append((ids, labels, nsp))
        return sets

    def step(net, backend, extra, ids, labels, nsp):
        if backend is not None:
            import fastbert
            fastbert.set_backend(backend)
        net.zero_grad(set_to_none=True)
        net(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=nsp,
            **extra).loss.backward()

    def provider(library, backend=None, **extra):
        def setup():
            if library == "fastbert":
                require_fastbert(backend)
            net = _pretraining_model(library, model, device, dtype)
            return rotate([functools.partial(step, net, backend, extra, *s) for s in inputs()])
        return setup

    backend = "auto" if device.type == "cuda" else "torch"
    providers = {
        "transformers-sdpa": provider("transformers"),
        f"fastbert-{backend}": provider("fastbert", backend, return_logits=False),
        f"fastbert-{backend}-full-logits": provider("fastbert", backend),
    }
    padding = 1.0 - sum(lengths) / (batch * seqlen)
    return Case("model", "pretrain", f"{model} B{batch} S{seqlen}", providers,
                work={"tokens": float(sum(lengths))},
                params=dict(model=model, seqlen=seqlen, padding=round(padding, 3)),
                gpu_rep_scale=8.0)


def model_cases(device: torch.device, cfg: dict) -> List[Case]:
    cases = [model_case(device, cfg, model, batch, seqlen, mode)
             for model, batch, seqlen, modes in cfg["models"] for mode in modes]
    return cases + [pretraining_case(device, cfg, model, batch, seqlen)
                    for model, batch, seqlen in cfg.get("pretraining", [])]
