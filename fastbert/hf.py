"""Hugging Face compatibility: checkpoint directories in and out, and patching transformers models.

    model = fastbert.BertForMaskedLM.from_pretrained("path/to/hf_checkpoint")   # offline
    model.save_pretrained("out")               # transformers.BertForMaskedLM.from_pretrained("out")
    hf_model = fastbert.patch_hf(hf_model)     # a transformers BERT, now on fastbert's ops

transformers is imported only inside patch_hf, so `import fastbert` stays light.
"""
from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn as nn

import fastbert
from fastbert.model import _GELU_APPROXIMATE, BertConfig, _can_pack_data_dependent
from fastbert.padding import pack_mask

# Checkpoint keys that are aliases of tied parameters (the MLM decoder is the word embeddings, its
# bias is cls.predictions.bias): transformers may leave them out of the files it writes.
_TIED_ALIASES = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
_BASE_MODULES = ("embeddings.", "encoder.", "pooler.")


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


def _match_prefix(state: dict, model: nn.Module) -> dict:
    """Translate between a bare BertModel checkpoint ("encoder.…") and a head checkpoint
    ("bert.encoder.…"), whichever the model is, as transformers does."""
    prefix = model.base_model_prefix + "."
    model_has_prefix = hasattr(model, model.base_model_prefix)
    ckpt_has_prefix = any(k.startswith(prefix) for k in state)
    if model_has_prefix and not ckpt_has_prefix:
        return {(prefix + k if k.startswith(_BASE_MODULES) else k): v for k, v in state.items()}
    if not model_has_prefix and ckpt_has_prefix:
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    return state


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
    if not os.path.isdir(path):
        raise FileNotFoundError(f"from_pretrained: expected a checkpoint directory, got {path!r}")
    model = cls(BertConfig.from_pretrained(path, **config_overrides))
    state = {_rename_legacy(k): v for k, v in read_state_dict(path).items()}
    missing, unexpected = model.load_state_dict(_match_prefix(state, model), strict=False)
    missing = [k for k in missing if k not in _TIED_ALIASES]
    unexpected = [k for k in unexpected if not k.endswith((".position_ids", ".token_type_ids"))]
    if missing:
        warnings.warn(f"{cls.__name__}.from_pretrained({path!r}): newly initialised (not in the "
                      f"checkpoint): {missing}")
    if unexpected:
        warnings.warn(f"{cls.__name__}.from_pretrained({path!r}): ignored checkpoint entries: "
                      f"{unexpected}")
    return model


def save_pretrained(model: nn.Module, path: str) -> None:
    """Write config.json and model.safetensors in Hugging Face's format and key names."""
    from safetensors.torch import save_file
    config = model.config
    if config.position_embedding_type == "sinusoidal":
        warnings.warn(f"save_pretrained({path!r}): position_embedding_type='sinusoidal' is "
                      f"fastbert's own (a fixed table, not a weight): fastbert loads this "
                      f"checkpoint, transformers cannot")
    config.extra["architectures"] = [type(model).__name__]
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
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# patching transformers models in place
# --------------------------------------------------------------------------------------------

def _key_padding_mask(attention_mask):
    """HF hands its attention modules an expanded mask: (B, 1, Sq, Sk) additive float (0 = visible)
    or bool (True = visible), a 2-D (B, Sk) mask, or None. fastbert wants (B, Sk), True = real key.
    The last query row sees every unpadded key even under a causal mask, so it is the padding mask."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, :]  # (B, Sk)
        return row if row.dtype == torch.bool else row == 0
    return attention_mask != 0


def _self_attention_forward(self, hidden_states, attention_mask=None, cache=None,
                            past_key_values=None, **kwargs):
    """BertSelfAttention.forward (transformers >= 5 interface) on fastbert.attention."""
    b, s, _ = hidden_states.shape
    d = self.attention_head_size
    q, k, v = (proj(hidden_states).view(b, s, -1, d)  # (B, S, nh, hd), no transposes needed
               for proj in (self.query, self.key, self.value))
    cache = cache if cache is not None else past_key_values
    if cache is not None:
        cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
        # HF caches (B, nh, S, hd); transposed views go to fastbert.attention without copies
        k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    out = fastbert.attention(q, k, v, _key_padding_mask(attention_mask),
                             causal=bool(getattr(self, "is_causal", False)),
                             dropout_p=self.dropout.p if self.training else 0.0,
                             softmax_scale=getattr(self, "scaling", d ** -0.5))
    return out.reshape(b, s, -1), None  # no attention weights: they are never materialised


def _add_norm_forward(self, hidden_states, input_tensor):
    """BertSelfOutput/BertOutput: LN(dropout(dense(h)) + residual), the add+dropout+LN fused."""
    norm = self.LayerNorm
    return fastbert.add_layer_norm(self.dense(hidden_states), input_tensor, norm.weight, norm.bias,
                                   norm.eps, dropout_p=self.dropout.p if self.training else 0.0)


def _intermediate_forward(self, hidden_states):
    return fastbert.linear_bias_gelu(hidden_states, self.dense.weight, self.dense.bias,
                                     approximate=self.fastbert_gelu_approximate)


def _layer_norm_forward(self, x):
    return fastbert.add_layer_norm(x, None, self.weight, self.bias, self.eps)


def _packed_layer(layer, x, packed):
    """One transformers BertLayer on packed real tokens x (T, C), through its own (patched)
    submodules: projections, attention_varlen, add+LayerNorm, FFN."""
    sa = layer.attention.self
    t, d = x.shape[0], sa.attention_head_size
    q, k, v = (proj(x).view(t, -1, d) for proj in (sa.query, sa.key, sa.value))  # (T, nh, hd)
    y = fastbert.attention_varlen(q, k, v, packed.cu_seqlens, packed.cu_seqlens,
                                  packed.max_seqlen, packed.max_seqlen,
                                  causal=bool(getattr(sa, "is_causal", False)),
                                  dropout_p=sa.dropout.p if sa.training else 0.0,
                                  softmax_scale=getattr(sa, "scaling", d ** -0.5))
    h = layer.attention.output(y.reshape(t, -1), x)  # (T, C)
    return layer.output(layer.intermediate(h), h)


def _encoder_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                     encoder_attention_mask=None, cache=None, use_cache=None, **kwargs):
    """BertEncoder.forward, unpadded: the real tokens are packed once (from the mask the model
    hands its layers), every layer runs on them, and the output is repadded with zeros. What
    the packed path does not cover (a cache, cross-attention, per-layer outputs requested, no
    padding at all) runs the original, padded loop over the patched layers."""
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    wants_layers = any(kwargs.get(f, getattr(self.config, f, False))
                       for f in ("output_hidden_states", "output_attentions"))
    mask = _key_padding_mask(attention_mask)
    if (mask is None or cache is not None or use_cache or encoder_hidden_states is not None
            or wants_layers or mask.shape != hidden_states.shape[:2]
            or not _can_pack_data_dependent()):
        return type(self).__mro__[1].forward(
            self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
            cache=cache, use_cache=use_cache, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
    packed = pack_mask(mask)
    x = packed.rows(hidden_states)  # (T, C)
    for layer in self.layer:
        x = _packed_layer(layer, x, packed)
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=packed.grid(x))


_patched_classes: dict = {}


def _patch(module: nn.Module, forward) -> None:
    """Give `module` a subclass of its class whose forward is `forward` (parameters untouched)."""
    base = type(module)
    if base not in _patched_classes:
        _patched_classes[base] = type(f"Fastbert{base.__name__}", (base,), {"forward": forward})
    module.__class__ = _patched_classes[base]


def patch_hf(model: nn.Module, unpad: bool = True) -> nn.Module:
    """Run a transformers BERT (BertModel or any Bert* head) on fastbert's ops, in place: its
    self-attention on fastbert.attention, every residual+LayerNorm on fastbert.add_layer_norm, the
    FFN's first Linear+GELU on fastbert.linear_bias_gelu. The Parameter objects stay the same, so
    an optimizer made before patching keeps training the model. Returns the model.

    unpad: the encoder runs on the real tokens only (packed once per forward, attention by
    fastbert.attention_varlen) and repads its output with zeros, so hidden states at padding
    positions are zeros instead of values computed from padding tokens; outputs at real tokens
    are unchanged. (A span-QA loss, which transformers normalises over every position padding
    included, then sees the classifier's bias at padding.)

    The self-attention patch follows the transformers >= 5 module interface; on older versions the
    attention is left as it is (with a warning) and the rest is patched."""
    import inspect

    from transformers.models.bert import modeling_bert as hf_bert

    new_attention_api = "head_mask" not in inspect.signature(hf_bert.BertSelfAttention.forward).parameters
    if not new_attention_api:
        warnings.warn("patch_hf: this transformers version's BertSelfAttention has the pre-5.0 "
                      "interface; its attention is left unpatched")
    hidden_act = getattr(getattr(model, "config", None), "hidden_act", None)
    approximate = _GELU_APPROXIMATE.get(hidden_act) if isinstance(hidden_act, str) else None
    for module in model.modules():
        kind = type(module)
        if kind is hf_bert.BertSelfAttention and new_attention_api:
            _patch(module, _self_attention_forward)
        elif kind in (hf_bert.BertSelfOutput, hf_bert.BertOutput):
            _patch(module, _add_norm_forward)
        elif kind is hf_bert.BertIntermediate and approximate is not None:
            module.fastbert_gelu_approximate = approximate
            _patch(module, _intermediate_forward)
        elif kind is nn.LayerNorm and module.elementwise_affine and module.bias is not None:
            _patch(module, _layer_norm_forward)
        elif kind is hf_bert.BertEncoder and new_attention_api and unpad:
            _patch(module, _encoder_forward)
    return model
