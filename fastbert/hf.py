"""Hugging Face compatibility: checkpoint directories in and out, and patching transformers models.

    model = fastbert.BertForMaskedLM.from_pretrained("path/to/hf_checkpoint")   # offline
    model.save_pretrained("out")               # transformers.BertForMaskedLM.from_pretrained("out")
    hf_model = fastbert.patch_hf(hf_model)     # a transformers BERT-family model on fastbert's ops

Checkpoints of RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT and ModernBERT load into the same classes
(fastbert.BertForMaskedLM.from_pretrained("roberta-base")) and are saved back in their own key
names, config fields and class names (fastbert/family.py), so transformers' Roberta*/XLMRoberta*/
Electra*/DistilBert*/ModernBert* classes load what fastbert writes.

transformers is imported only inside patch_hf (fastbert/hf_patch.py), so `import fastbert` stays
light.
"""
from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn as nn

from fastbert.family import fastbert_base_class
from fastbert.model import BertConfig

# Checkpoint keys that are aliases of tied parameters (the MLM decoder is the word embeddings, its
# bias is cls.predictions.bias): transformers may leave them out of the files it writes.
_TIED_ALIASES = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


# --------------------------------------------------------------------------------------------
# checkpoint I/O
# --------------------------------------------------------------------------------------------

def read_state_dict(path: str) -> dict:
    """All tensors of a HF checkpoint directory: model.safetensors (single or sharded), else
    pytorch_model.bin."""
    from safetensors.torch import load_file
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"from_pretrained: no model.safetensors, model.safetensors.index.json "
                            f"or pytorch_model.bin in {path!r}")


def _rename_legacy(key: str) -> str:
    # the oldest BERT checkpoints name LayerNorm parameters gamma/beta
    if key.endswith(".gamma"):
        return key[:-len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[:-len("beta")] + "bias"
    return key


def load_pretrained(cls, path: str, **config_overrides):
    """cls.from_pretrained: build cls from path/config.json (with overrides) and load the weights.
    Weights the checkpoint lacks (a new head) keep their fresh initialisation, with a warning, as
    in transformers; checkpoint entries the model has no place for are ignored, with a warning."""
    what = f"{cls.__name__}.from_pretrained"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: expected a checkpoint directory, got {path!r} (no such "
                                f"directory; fastbert reads local folders and does not download Hub "
                                f"names: fetch one with `huggingface-cli download NAME --local-dir DIR`)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what}: {path!r} is not a Hugging Face checkpoint folder: expected "
                                f"config.json (and model.safetensors or pytorch_model.bin) in it")
    config = BertConfig.from_pretrained(path, **config_overrides)
    model = cls(config)
    state = {_rename_legacy(k): v for k, v in read_state_dict(path).items()}
    # a bare base-model checkpoint into a head class and back, as transformers does
    bare = not _has_base_prefix(model)
    state = config.family.from_checkpoint(state, bare_model=bare, model_keys=model.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _TIED_ALIASES]
    unexpected = [k for k in unexpected if not k.endswith((".position_ids", ".token_type_ids"))]
    unexpected = list(config.family.to_checkpoint(dict.fromkeys(unexpected), bare=bare))
    if missing:
        warnings.warn(f"{cls.__name__}.from_pretrained({path!r}): newly initialised (not in the "
                      f"checkpoint): {missing}")
    if unexpected:
        warnings.warn(f"{cls.__name__}.from_pretrained({path!r}): ignored checkpoint entries: "
                      f"{unexpected}")
    return model


def _has_base_prefix(model: nn.Module) -> bool:
    """Whether the model is a head class (its encoder under `bert.`), not a bare BertModel."""
    return hasattr(model, model.base_model_prefix)


def _architecture(model: nn.Module) -> str:
    """transformers' class name for this model in its family (subclasses: their fastbert base)."""
    name = fastbert_base_class(type(model))
    return model.config.family.architecture(name) if name is not None else type(model).__name__


def save_pretrained(model: nn.Module, path: str) -> None:
    """Write config.json and model.safetensors in Hugging Face's format, with the key names,
    config fields and class name of the model's family (BERT, RoBERTa, ... ELECTRA)."""
    from safetensors.torch import save_file
    config = model.config
    if config.position_embedding_type == "sinusoidal":
        warnings.warn(f"save_pretrained({path!r}): position_embedding_type='sinusoidal' is "
                      f"fastbert's own (a fixed table, not a weight): fastbert loads this "
                      f"checkpoint, transformers cannot")
    config.extra["architectures"] = [_architecture(model)]
    config.save_pretrained(path)
    # safetensors refuses tensors that share memory: keep the first name of each tied parameter
    # (transformers re-ties the rest) and copy the query/key/value slices out of the fused qkv.
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if ident in seen:
            continue
        seen.add(ident)
        tensors[name] = t.detach().contiguous().clone()
    tensors = config.family.to_checkpoint(tensors, bare=not _has_base_prefix(model))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# patching transformers models in place: fastbert/hf_patch.py
# --------------------------------------------------------------------------------------------

from fastbert.hf_patch import patch_hf  # noqa: E402,F401  (fastbert.hf.patch_hf)
