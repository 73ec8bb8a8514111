"""Patching transformers encoders in place: BERT, RoBERTa, XLM-RoBERTa, ELECTRA and DistilBERT (base
models and every task head) run on fastbert's ops with their own Parameter objects.

    hf_model = fastbert.patch_hf(hf_model)     # same weights, same outputs at real tokens

transformers is imported only inside patch_hf, so importing this module stays light.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint

import fastbert
from fastbert.model import _GELU_APPROXIMATE, _can_pack_data_dependent
from fastbert.padding import pack_mask

# attention implementations whose masks reach the layers as something other than a tensor or None
_UNSERVED_ATTENTION = {"flex_attention": "its layers receive a BlockMask, not a padding mask"}


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


def _dropout_p(module: nn.Module) -> float:
    return module.dropout.p if module.training else 0.0


# --------------------------------------------------------------------------------------------
# attention, shared by every family: `sa` has attention_head_size, dropout and optionally
# is_causal / scaling; the three projections are its query/key/value (q_lin/k_lin/v_lin)
# --------------------------------------------------------------------------------------------

def _padded_attention(sa, projections, hidden_states, attention_mask, cache=None):
    """(B, S, C) -> (B, S, nh * hd) on fastbert.attention."""
    b, s, _ = hidden_states.shape
    d = sa.attention_head_size
    q, k, v = (proj(hidden_states).view(b, s, -1, d)  # (B, S, nh, hd), no transposes needed
               for proj in projections)
    if cache is not None:
        cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
        # HF caches (B, nh, S, hd); transposed views go to fastbert.attention without copies
        k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), sa.layer_idx)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    out = fastbert.attention(q, k, v, _key_padding_mask(attention_mask),
                             causal=bool(getattr(sa, "is_causal", False)),
                             dropout_p=_dropout_p(sa),
                             softmax_scale=getattr(sa, "scaling", d ** -0.5))
    return out.reshape(b, s, -1)


def _packed_attention(sa, projections, x, packed):
    """Packed real tokens (T, C) -> (T, nh * hd) on fastbert.attention_varlen."""
    t, d = x.shape[0], sa.attention_head_size
    q, k, v = (proj(x).view(t, -1, d) for proj in projections)  # (T, nh, hd)
    y = fastbert.attention_varlen(q, k, v, packed.cu_seqlens, packed.cu_seqlens,
                                  packed.max_seqlen, packed.max_seqlen,
                                  causal=bool(getattr(sa, "is_causal", False)),
                                  dropout_p=_dropout_p(sa),
                                  softmax_scale=getattr(sa, "scaling", d ** -0.5))
    return y.reshape(t, -1)


def _add_norm(x, residual, norm: nn.LayerNorm, dropout_p: float = 0.0):
    """LN(dropout(x) + residual) as one fastbert.add_layer_norm."""
    return fastbert.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps,
                                   dropout_p=dropout_p)


# --------------------------------------------------------------------------------------------
# BERT layout (BERT, RoBERTa, XLM-RoBERTa, ELECTRA): Layer = attention.self, attention.output,
# intermediate, output
# --------------------------------------------------------------------------------------------

def _self_attention_forward(self, hidden_states, attention_mask=None, cache=None,
                            past_key_values=None, **kwargs):
    """*SelfAttention.forward (transformers >= 5 interface) on fastbert.attention."""
    cache = cache if cache is not None else past_key_values
    out = _padded_attention(self, (self.query, self.key, self.value), hidden_states,
                            attention_mask, cache)
    return out, None  # no attention weights: they are never materialised


def _add_norm_forward(self, hidden_states, input_tensor):
    """*SelfOutput/*Output: LN(dropout(dense(h)) + residual), the add+dropout+LN fused."""
    return _add_norm(self.dense(hidden_states), input_tensor, self.LayerNorm, _dropout_p(self))


def _intermediate_forward(self, hidden_states):
    return fastbert.linear_bias_gelu(hidden_states, self.dense.weight, self.dense.bias,
                                     approximate=self.fastbert_gelu_approximate)


def _packed_bert_layer(layer, x, packed):
    """One BERT-layout layer on packed real tokens x (T, C), through its own (patched)
    submodules: projections, attention_varlen, add+LayerNorm, FFN."""
    sa = layer.attention.self
    y = _packed_attention(sa, (sa.query, sa.key, sa.value), x, packed)
    h = layer.attention.output(y, x)  # (T, C)
    return layer.output(layer.intermediate(h), h)


# --------------------------------------------------------------------------------------------
# DistilBERT layout: TransformerBlock = attention (q/k/v/out_lin), sa_layer_norm, ffn
# (lin1, activation, lin2, dropout), output_layer_norm; no dropout after out_lin
# --------------------------------------------------------------------------------------------

def _distilbert_attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    out = _padded_attention(self, (self.q_lin, self.k_lin, self.v_lin), hidden_states,
                            attention_mask)
    return self.out_lin(out), None


def _distilbert_ffn(block, h):
    ffn = block.ffn
    approximate = getattr(ffn, "fastbert_gelu_approximate", None)
    if approximate is not None:
        a = fastbert.linear_bias_gelu(h, ffn.lin1.weight, ffn.lin1.bias, approximate=approximate)
    else:
        a = ffn.activation(ffn.lin1(h))
    return _add_norm(ffn.lin2(a), h, block.output_layer_norm, _dropout_p(ffn))


def _distilbert_block_forward(self, hidden_states, attention_mask=None, **kwargs):
    a, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    return _distilbert_ffn(self, _add_norm(a, hidden_states, self.sa_layer_norm))


def _packed_distilbert_block(block, x, packed):
    sa = block.attention
    y = sa.out_lin(_packed_attention(sa, (sa.q_lin, sa.k_lin, sa.v_lin), x, packed))
    return _distilbert_ffn(block, _add_norm(y, x, block.sa_layer_norm))


# --------------------------------------------------------------------------------------------
# the encoder, unpadded
# --------------------------------------------------------------------------------------------

def _encoder_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """*Encoder.forward / DistilBERT's Transformer.forward, unpadded: the real tokens are packed
    once (from the mask the model hands its layers), every layer runs on them, and the output is
    repadded with zeros. What the packed path does not cover (a cache, cross-attention, per-layer
    outputs requested, no padding at all) runs the original, padded loop over the patched layers."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    cross = [a for a in (*args, kwargs.get("encoder_hidden_states")) if a is not None]
    config = _config_of(self)
    wants_layers = any(kwargs.get(f, getattr(config, f, False))
                       for f in ("output_hidden_states", "output_attentions"))
    mask = _key_padding_mask(attention_mask)
    if (mask is None or cache is not None or kwargs.get("use_cache") or cross or wants_layers
            or mask.shape != hidden_states.shape[:2] or not _can_pack_data_dependent()):
        return type(self).__mro__[1].forward(self, hidden_states, attention_mask, *args, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
    packed = pack_mask(mask)
    x = packed.rows(hidden_states)  # (T, C)
    for layer in self.layer:
        if getattr(layer, "gradient_checkpointing", False) and layer.training:
            x = torch.utils.checkpoint.checkpoint(self.fastbert_packed_layer, layer, x, packed,
                                                  use_reentrant=False)
        else:
            x = self.fastbert_packed_layer(layer, x, packed)
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=packed.grid(x))


# --------------------------------------------------------------------------------------------
# the families and patch_hf
# --------------------------------------------------------------------------------------------

@dataclass
class _Family:
    """One architecture's module classes (from its own modeling file) and what each becomes."""
    name: str
    encoder: type
    packed_layer: Callable
    attention: type  # the self-attention class: head size, mask and interface checks
    forwards: dict = field(default_factory=dict)  # class -> patched forward
    gelu_modules: tuple = ()  # classes whose Linear+GELU is fused, given a GELU activation


def _bert_layout(name: str, module, prefix: str) -> _Family:
    def cls(role: str) -> type:  # e.g. RobertaSelfOutput, from modeling_roberta itself
        return getattr(module, prefix + role)
    return _Family(name, cls("Encoder"), _packed_bert_layer, cls("SelfAttention"),
                   {cls("SelfAttention"): _self_attention_forward,
                    cls("SelfOutput"): _add_norm_forward, cls("Output"): _add_norm_forward,
                    cls("Intermediate"): _intermediate_forward},
                   gelu_modules=(cls("Intermediate"),))


def _families() -> list:
    from transformers.models.bert import modeling_bert
    from transformers.models.distilbert import modeling_distilbert as distil
    from transformers.models.electra import modeling_electra
    from transformers.models.roberta import modeling_roberta
    from transformers.models.xlm_roberta import modeling_xlm_roberta
    # transformers < 5 names it MultiHeadSelfAttention (and patch_hf refuses its interface)
    distil_attention = getattr(distil, "DistilBertSelfAttention", None) or getattr(
        distil, "MultiHeadSelfAttention")
    return [
        _bert_layout("BERT", modeling_bert, "Bert"),
        _bert_layout("RoBERTa", modeling_roberta, "Roberta"),
        _bert_layout("XLM-RoBERTa", modeling_xlm_roberta, "XLMRoberta"),
        _bert_layout("ELECTRA", modeling_electra, "Electra"),
        _Family("DistilBERT", distil.Transformer, _packed_distilbert_block, distil_attention,
                {distil_attention: _distilbert_attention_forward,
                 distil.TransformerBlock: _distilbert_block_forward},
                gelu_modules=(distil.FFN,)),
    ]


_patched_classes: dict = {}  # original class -> its Fastbert subclass


def _original(kind: type) -> type:
    return kind.__mro__[1] if kind in _patched_classes.values() else kind


def _patch(module: nn.Module, forward, **class_attributes) -> None:
    """Give `module` a subclass of its class whose forward is `forward` (parameters untouched)."""
    base = type(module)
    if base not in _patched_classes:
        _patched_classes[base] = type(f"Fastbert{base.__name__}", (base,),
                                      {"forward": forward, **class_attributes})
    module.__class__ = _patched_classes[base]


def _new_attention_api(family: _Family) -> bool:
    import inspect
    return "head_mask" not in inspect.signature(family.attention.forward).parameters


def _config_of(encoder: nn.Module):
    """The model config an encoder reads (DistilBERT's Transformer keeps none itself)."""
    config = getattr(encoder, "config", None)
    return config if config is not None else getattr(encoder.layer[0].attention, "config", None)


def _problems(model: nn.Module, encoders: list) -> list:
    """Every module patch_hf cannot serve, as 'name (Class): why'."""
    problems = []

    def where(name: str, module: nn.Module) -> str:
        return f"{name or 'the model'} ({type(module).__name__})"

    for name, module in model.named_modules():
        family = next((f for e, f in encoders if module is e), None)
        if family is not None and family.name != "BERT" and not _new_attention_api(family):
            problems.append(f"{where(name, module)}: this transformers version's {family.name} "
                            f"attention has the pre-5.0 interface")
        if family is not None:
            implementation = getattr(_config_of(module), "_attn_implementation", None)
            if implementation in _UNSERVED_ATTENTION:
                problems.append(f"{where(name, module)}: attn_implementation={implementation!r}: "
                                f"{_UNSERVED_ATTENTION[implementation]}")
        head_dim = getattr(module, "attention_head_size", None)
        if (any(_original(type(module)) is f.attention for _, f in encoders)
                and head_dim > fastbert.ops.MAX_HEAD_DIM):
            problems.append(f"{where(name, module)}: head dim {head_dim} is over fastbert's "
                            f"{fastbert.ops.MAX_HEAD_DIM}")
    return problems


def patch_hf(model: nn.Module, unpad: bool = True) -> nn.Module:
    """Run a transformers BERT, RoBERTa, XLM-RoBERTa, ELECTRA or DistilBERT (the base model or any
    task head) on fastbert's ops, in place: self-attention on fastbert.attention, every
    residual+LayerNorm on fastbert.add_layer_norm, the FFN's first Linear+GELU on
    fastbert.linear_bias_gelu (other activations stay as they are). The Parameter objects stay the
    same, so an optimizer made before patching keeps training the model. Returns the model.

    unpad: the encoder runs on the real tokens only (packed once per forward, attention by
    fastbert.attention_varlen) and repads its output with zeros, so hidden states at padding
    positions are zeros instead of values computed from padding tokens; outputs at real tokens
    are unchanged. (A span-QA loss, which transformers normalises over every position padding
    included, then sees the classifier's bias at padding.)

    Everything is checked before anything is patched: a model with no encoder of these families,
    or a module fastbert cannot serve (flex attention's BlockMask, a head dim over
    fastbert.ops.MAX_HEAD_DIM), raises ValueError/TypeError naming the module and leaves the model
    untouched. On transformers < 5 a BERT's attention is left unpatched (with a warning)."""
    if not isinstance(model, nn.Module):  # e.g. a Hub name: patch_hf patches a model already loaded
        raise TypeError(f"patch_hf: expected a transformers model (an nn.Module), got {type(model).__name__} {model!r}; load it first, e.g. transformers.AutoModel.from_pretrained(folder)")
    families = _families()
    encoders = [(m, f) for m in model.modules() for f in families
                if _original(type(m)) is f.encoder]  # (module, family)
    if not encoders:
        raise TypeError(f"patch_hf: {type(model).__name__} contains no encoder fastbert serves "
                        f"(expected {', '.join(f.name for f in families)}: a base model or a task "
                        f"head)")
    problems = _problems(model, encoders)
    if problems:
        raise ValueError("patch_hf: cannot serve " + "; ".join(problems) + " (nothing was patched)")

    bert = families[0]
    new_bert_api = _new_attention_api(bert)
    if not new_bert_api:
        warnings.warn("patch_hf: this transformers version's BertSelfAttention has the pre-5.0 "
                      "interface; its attention is left unpatched")
        bert.forwards.pop(bert.attention)
    for encoder, family in encoders:
        _patch_encoder(encoder, family, unpad=unpad and (family is not bert or new_bert_api))
    # LayerNorms outside the encoders (embeddings, heads): y = LN(x) on fastbert.add_layer_norm
    for module in model.modules():
        if (type(module) is nn.LayerNorm and module.elementwise_affine
                and module.bias is not None):
            _patch(module, _layer_norm_forward)
    return model


def _patch_encoder(encoder: nn.Module, family: _Family, unpad: bool) -> None:
    config = _config_of(encoder)  # DistilBERT names its activation `activation`
    act = getattr(config, "hidden_act", None) or getattr(config, "activation", None)
    approximate = _GELU_APPROXIMATE.get(act) if isinstance(act, str) else None
    for module in encoder.modules():
        kind = type(module)
        if kind in family.gelu_modules:
            # fused only for a GELU through a plain Linear (an adapter-wrapped one keeps its call)
            linear = module.dense if hasattr(module, "dense") else module.lin1
            if approximate is None or type(linear) is not nn.Linear:
                continue
            module.fastbert_gelu_approximate = approximate
        if kind in family.forwards:
            _patch(module, family.forwards[kind])
    if unpad and type(encoder) is family.encoder:
        _patch(encoder, _encoder_forward, fastbert_packed_layer=staticmethod(family.packed_layer))


def _layer_norm_forward(self, x):
    return fastbert.add_layer_norm(x, None, self.weight, self.bias, self.eps)
