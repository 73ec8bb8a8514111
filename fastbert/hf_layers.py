"""The forwards patch_hf gives a transformers encoder's submodules, and the call-time rule they
follow: a fused path serves a plain module only (an nn.Linear / nn.LayerNorm with no hooks);
anything else -- a LoRA wrapper, a quantized linear, a hooked module -- is called as a module, so
what a user attaches after patching is honoured.

    _attend(sa, h, mask, packed, ...)   self-attention: one fused QKV GEMM in training when
                                        query, key and value are plain (three in inference),
                                        fastbert.attention / attention_varlen, or the reference
                                        math when probabilities are asked for
    model.linear(x, module)             a projection: the CPU inference GEMM path for a plain
                                        nn.Linear, the module's own call otherwise
    _add_norm(x, residual, norm, p)     LN(dropout(x) + residual), fused for a plain LayerNorm

Shapes: h (B, S, C) padded or (T, C) / (1, T, C) packed; q, k, v (..., nh, hd).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module

import fastbert
from fastbert import cpu_train, model
from fastbert.model import linear
from fastbert.padding import PackedBatch, _sequence_and_position

_probabilities_warned = False


def base_class(kind: type) -> type:
    """The class patch_hf subclassed, for one of its patched classes; `kind` otherwise."""
    return kind.__mro__[1] if kind.__dict__.get("fastbert_patched") else kind


def plain(module: nn.Module, kind: type = nn.Linear) -> bool:
    """model.plain, with patch_hf's subclass of `kind` (a patched LayerNorm) counted as `kind`."""
    return base_class(type(module)) is kind and model.plain(module, type(module))


# attention implementations computing what fastbert.attention does; any other (a function
# registered with transformers' AttentionInterface, flex) runs transformers' own forward
SERVED_ATTENTION = frozenset({"eager", "sdpa", "flash_attention_2", "flash_attention_3"})


def refuse_jit_trace():
    """Raised where a patched model's forward starts under torch.jit.trace (callers check
    torch.jit.is_tracing(), which torch.compile reads as False)."""
    raise RuntimeError(
        "fastbert.patch_hf: torch.jit.trace (and torch.onnx.export(dynamo=False), which traces) "
        "cannot record a patched model: its fused ops run outside the TorchScript graph, which "
        "would keep their results as constants. Trace or export the unpatched model (the same "
        "weights), or use torch.export or torch.compile, which see fastbert's ops.")


def serves_attention(config) -> bool:
    """Whether fastbert computes the attention `config` selects (read per call: the model's
    set_attn_implementation may change it after patching)."""
    implementation = getattr(config, "_attn_implementation", None)
    return implementation is None or implementation in SERVED_ATTENTION


# transformers.activations' GELU classes, by name (no import, and no table filled while
# torch.compile traces) -> the GELU they compute as fastbert's fused ops take it ("none": erf,
# "tanh"), or "erf?": GELUActivation, erf unless built with its Python formula
_HF_GELUS = {"GELUActivation": "erf?", "NewGELUActivation": "tanh", "GELUTanh": "tanh",
             "PytorchGELUTanh": "tanh"}


def gelu_approximate(act) -> Optional[str]:
    """The GELU an activation computes ("none", "tanh"), read off the module itself (it may have
    been replaced after the config was written), or None for any other activation or a hooked
    one: those run as they are, after the GEMM. Per layer and forward: kept to a few calls."""
    kind = type(act)
    if kind is nn.GELU:
        variant = act.approximate
    elif kind.__module__ == "transformers.activations":
        variant = _HF_GELUS.get(kind.__name__)
        if variant == "erf?":
            variant = "none" if act.__dict__.get("act") is F.gelu else None
    else:
        return "none" if act is F.gelu else None
    if variant is None or act._forward_hooks or act._forward_pre_hooks:
        return None
    return variant


def _dropout_p(module: nn.Module) -> float:
    """The attention-probability dropout: transformers reads it off the attention module's
    `dropout` (its p, the attention's own training flag) without calling it."""
    return module.dropout.p if module.training else 0.0


def for_every_module() -> bool:
    """Whether forward hooks for every module are set (what model.plain checks of the modules it
    fuses): the modules they would see are called."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def hooks_see(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks: its own (forward or backward), or forward hooks
    for every module. A module the patched forwards would otherwise fuse is then called."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or for_every_module())


def output_dropout_p(module: nn.Module) -> Optional[float]:
    """The p of the `dropout` module a *Output (or DistilBERT's FFN) calls, as that module stands
    (its own training flag), for add_layer_norm to fuse; None where it must be called: not a
    plain nn.Dropout (replaced, by nn.Identity say) or one hooks would see."""
    drop = module._modules["dropout"]
    if drop.__class__ is not nn.Dropout or hooks_see(drop):
        return None
    return drop.p if drop.training else 0.0


def _add_norm(x, residual, norm: nn.Module, dropout_p: float = 0.0):
    """LN(dropout(x) + residual): one fastbert.add_layer_norm for a plain (patched) LayerNorm."""
    if plain(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None:
        return fastbert.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps,
                                       dropout_p=dropout_p)
    return norm(F.dropout(x, dropout_p, training=dropout_p > 0) + residual)


# --------------------------------------------------------------------------------------------
# the fused QKV projection
# --------------------------------------------------------------------------------------------

def _fused_qkv_weight(projections) -> tuple:
    """([Wq; Wk; Wv], [bq; bk; bv] or None), concatenated per call, so gradients reach the three
    original parameters. Only where a gradient is wanted: inference computes the three
    projections apart (_qkv). A fused copy kept between calls could go stale: writes through
    .data, fused optimizers (AdamW(fused=True), the Trainer's default) and peft's merge change a
    weight without bumping its version counter."""
    weights = [p._parameters["weight"] for p in projections]  # plain nn.Linear modules
    biases = [p._parameters["bias"] for p in projections]
    return torch.cat(weights), torch.cat(biases) if biases[0] is not None else None


def _wants_grad(projections, h: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (h.requires_grad or any(
        t is not None and t.requires_grad for p in projections
        for t in (p._parameters["weight"], p._parameters["bias"])))


def _qkv(sa: nn.Module, projections, h: torch.Tensor):
    """Three (..., nh, hd) tensors: with a gradient wanted, views of one GEMM's output when the
    three projections are plain nn.Linear with matching biases; otherwise each projection's GEMM
    (the CPU inference GEMM where it serves: apart, they cost 1.0-1.05x one fused GEMM from 128
    tokens up, up to 1.3x at 8 tokens) or its own call."""
    d = sa.attention_head_size
    if (all(plain(p) for p in projections) and len({p.bias is None for p in projections}) == 1
            and _wants_grad(projections, h)):
        w, b = _fused_qkv_weight(projections)
        return cpu_train.linear_nd(h, w, b).view(*h.shape[:-1], 3, -1, d).unbind(-3)
    return tuple(linear(h, p).view(*h.shape[:-1], -1, d) for p in projections)


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------

def wants_probabilities(sa: nn.Module, kwargs: dict) -> bool:
    """output_attentions, from the call (transformers passes it down) or the model config."""
    asked = kwargs.get("output_attentions")
    if asked is None:
        asked = getattr(getattr(sa, "config", None), "output_attentions", False)
    return bool(asked)


def _warn_probabilities() -> None:
    global _probabilities_warned
    if not _probabilities_warned:
        _probabilities_warned = True
        warnings.warn("patch_hf: output_attentions=True: fastbert's fused attention never forms "
                      "the probabilities, so calls that ask for them run their attention through "
                      "the reference math (transformers' eager attention), which is slower",
                      stacklevel=4)


def _reference_attention(q, k, v, additive, scale: float, dropout_p: float):
    """Eager attention as transformers computes it. q (B, Sq, nh, hd), k/v (B, Sk, nh, hd),
    additive mask broadcastable to (B, nh, Sq, Sk) or None -> ((B, Sq, nh, hd), (B, nh, Sq, Sk))."""
    scores = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(-1, -2)) * scale
    if additive is not None:
        scores = scores + additive.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    dropped = F.dropout(probs, dropout_p, training=dropout_p > 0)
    return torch.matmul(dropped, v.transpose(1, 2)).transpose(1, 2), probs


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(dtype).min) if visible.dtype == torch.bool else visible


def _padded_probabilities(q, k, v, attention_mask, causal: bool, scale: float, dropout_p: float):
    """HF hands the layer a (B, 1, Sq, Sk) additive or bool mask (causality included), or None
    (then causal, bottom-right aligned, for a decoder)."""
    additive = None
    if attention_mask is not None:
        mask = attention_mask if attention_mask.dim() == 4 else attention_mask[:, None, None, :]
        additive = _additive(mask if mask.dtype == torch.bool or mask.is_floating_point()
                             else mask != 0, q.dtype)
    elif causal:
        sq, sk = q.shape[1], k.shape[1]
        visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        additive = _additive(visible, q.dtype)
    return _reference_attention(q, k, v, additive, scale, dropout_p)


def _packed_probabilities(q, k, v, packed: PackedBatch, causal: bool, scale: float,
                          dropout_p: float):
    """Packed (T, nh, hd) tokens as one (1, T) grid with a block-diagonal mask: each sequence
    attends to itself only."""
    t = q.shape[0]
    seq, pos = _sequence_and_position(packed.cu_seqlens, t)
    visible = seq[:, None] == seq[None, :]
    if causal:
        visible &= pos[None, :] <= pos[:, None]
    y, probs = _reference_attention(q[None], k[None], v[None], _additive(visible, q.dtype),
                                    scale, dropout_p)
    return y[0], probs


def _attend(sa: nn.Module, projections, h: torch.Tensor, attention_mask,
            packed: Optional[PackedBatch], cache=None, want_probs: bool = False):
    """Self-attention of one layer -> (output (..., nh * hd), probabilities or None).
    packed: h holds packed real tokens ((T, C) or (1, T, C)) and each sequence attends to itself."""
    d = sa.attention_head_size
    causal = bool(getattr(sa, "is_causal", False))
    scale = getattr(sa, "scaling", d ** -0.5)
    dropout_p = _dropout_p(sa)
    q, k, v = _qkv(sa, projections, h)
    if want_probs:
        _warn_probabilities()
    if packed is not None:
        q, k, v = (t.reshape(-1, *t.shape[-2:]) for t in (q, k, v))  # (T, nh, hd)
        if want_probs:
            y, probs = _packed_probabilities(q, k, v, packed, causal, scale, dropout_p)
        else:
            y, probs = fastbert.attention_varlen(
                q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                packed.max_seqlen, causal=causal, dropout_p=dropout_p, softmax_scale=scale), None
        return y.reshape(*h.shape[:-1], -1), probs
    if cache is not None:
        cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
        # HF caches (B, nh, S, hd); transposed views go to fastbert.attention without copies
        k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), sa.layer_idx)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    if want_probs:
        y, probs = _padded_probabilities(q, k, v, attention_mask, causal, scale, dropout_p)
    else:
        y, probs = fastbert.attention(q, k, v, key_padding_mask(attention_mask), causal=causal,
                                      dropout_p=dropout_p, softmax_scale=scale), None
    return y.reshape(*h.shape[:-1], -1), probs


def key_padding_mask(attention_mask):
    """HF hands its attention modules an expanded mask: (B, 1, Sq, Sk) additive float (0 = visible)
    or bool (True = visible), a 2-D (B, Sk) mask, or None. fastbert wants (B, Sk), True = real key.
    A square mask's diagonal is it (a token sees itself unless it is padding, under causal or
    block-diagonal masks too: transformers >= 5.25 makes the latter from packed position ids);
    otherwise (queries against a cache) the last query row, which sees every unpadded key."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        square = attention_mask.shape[-2] == attention_mask.shape[-1]
        row = (torch.diagonal(attention_mask[:, 0], dim1=-2, dim2=-1) if square
               else attention_mask[:, 0, -1, :])  # (B, Sk)
        return row if row.dtype == torch.bool else row == 0
    return attention_mask != 0


# --------------------------------------------------------------------------------------------
# patched forwards (each a method of the module it replaces the forward of)
# --------------------------------------------------------------------------------------------

def self_attention_forward(self, hidden_states, attention_mask=None, cache=None,
                           past_key_values=None, fastbert_packed=None, **kwargs):
    """*SelfAttention.forward (transformers >= 5 interface)."""
    if kwargs.pop("fastbert_dense_mask", False) or not serves_attention(
            getattr(self, "config", None)):  # a caller's 4-D mask (hf_patch._mark_dense_mask)
        given = {k: v for k, v in (("cache", cache), ("past_key_values", past_key_values))
                 if v is not None}
        return base_class(type(self)).forward(self, hidden_states, attention_mask, **given,
                                              **kwargs)
    cache = cache if cache is not None else past_key_values
    return _attend(self, (self.query, self.key, self.value), hidden_states, attention_mask,
                   fastbert_packed, cache, wants_probabilities(self, kwargs))


def add_norm_forward(self, hidden_states, input_tensor):
    """*SelfOutput/*Output: LN(dropout(dense(h)) + residual), the add+dropout+LN fused (a
    dropout module that must be called runs first, output_dropout_p)."""
    h = linear(hidden_states, self.dense)
    p = output_dropout_p(self)
    if p is None:
        return _add_norm(self.dropout(h), input_tensor, self.LayerNorm)
    return _add_norm(h, input_tensor, self.LayerNorm, p)


def intermediate_forward(self, hidden_states):
    """*Intermediate: gelu(dense(h)) as one fastbert.linear_bias_gelu for a plain Linear with a
    bias and a GELU activation module (gelu_approximate); any other runs after the GEMM."""
    approximate = gelu_approximate(self.intermediate_act_fn)
    if approximate is not None and plain(self.dense) and self.dense.bias is not None:
        return fastbert.linear_bias_gelu(hidden_states, self.dense.weight, self.dense.bias,
                                         approximate=approximate)
    return self.intermediate_act_fn(linear(hidden_states, self.dense))


def distilbert_attention_forward(self, hidden_states, attention_mask=None, fastbert_packed=None,
                                 **kwargs):
    if kwargs.pop("fastbert_dense_mask", False) or not serves_attention(
            getattr(self, "config", None)):
        return base_class(type(self)).forward(self, hidden_states, attention_mask, **kwargs)
    y, probs = _attend(self, (self.q_lin, self.k_lin, self.v_lin), hidden_states, attention_mask,
                       fastbert_packed, want_probs=wants_probabilities(self, kwargs))
    return linear(y, self.out_lin), probs


def distilbert_block_forward(self, hidden_states, attention_mask=None, **kwargs):
    """TransformerBlock: attention, sa_layer_norm, FFN (lin1, activation, lin2, dropout),
    output_layer_norm; no dropout after out_lin."""
    a, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    h = _add_norm(a, hidden_states, self.sa_layer_norm)
    ffn = self.ffn
    if hooks_see(ffn):  # called as a module, so its hooks fire
        return _add_norm(ffn(h), h, self.output_layer_norm)
    approximate = gelu_approximate(ffn.activation)
    if approximate is not None and plain(ffn.lin1) and ffn.lin1.bias is not None:
        f = fastbert.linear_bias_gelu(h, ffn.lin1.weight, ffn.lin1.bias, approximate=approximate)
    else:
        f = ffn.activation(linear(h, ffn.lin1))
    f = linear(f, ffn.lin2)
    p = output_dropout_p(ffn)
    if p is None:
        return _add_norm(ffn.dropout(f), h, self.output_layer_norm)
    return _add_norm(f, h, self.output_layer_norm, p)


def layer_norm_forward(self, x):
    return fastbert.add_layer_norm(x, None, self.weight, self.bias, self.eps)
