"""The lean eager path of a patched transformers encoder (issue 22): fastbert/lean.py's plan, for
the BERT-layout families patch_hf serves (BERT, RoBERTa, XLM-RoBERTa, ELECTRA).

A patched layer is five module calls deep (Layer -> Attention -> SelfAttention / SelfOutput,
Intermediate, Output), each through nn.Module.__call__ and transformers' wrappers, and each fused
op re-checks its arguments. When nothing in a layer needs those calls -- the modules are exactly
the classes patch_hf made, none has a hook, no gradient checkpointing, no chunked feed-forward, no
attention probabilities asked for -- the encoder checks that once per forward (`plan`) and runs
each layer as one function (`layer_forward`) on lean.py's direct backend calls:

    plan = hf_lean.plan(encoder, x, packed, mask, kwargs)   # None: the modules serve it
    x = hf_lean.run(encoder, x, plan)                         # each layer: layer_forward

The ops, their order, the seeds drawn and therefore outputs, gradients and dropout masks are
those of the patched modules (tests/test_hf_lean.py). The projections and norms are still decided
per call as hf_layers decides them: a LoRA wrapper, a quantized linear or a hooked Linear /
LayerNorm is called as a module. Submodules are read from _modules (nn.Module.__getattr__'s
Python call saved).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastbert import hf_layers, lean
from fastbert.hf_layers import base_class
from fastbert.padding import PackedBatch


def _hooked(module: nn.Module) -> bool:
    """lean._hooked, except for transformers' output-capturing hooks while they capture nothing:
    transformers >= 5 installs them on the layers the first time hidden states or attentions are
    asked for and leaves them there; they act only while its collector asks for an output."""
    if not lean._hooked(module):
        return False
    if module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return True
    for hook in module._forward_hooks.values():
        if getattr(hook, "__name__", None) != "output_capturing_hook" \
                or getattr(hook, "__module__", None) != "transformers.utils.output_capturing":
            return True
    from transformers.utils import output_capturing
    return bool(output_capturing._active_collector.get())


def _patched_as(module: nn.Module, forward) -> bool:
    """Exactly the class patch_hf made with this forward (not a further subclass or wrapper)."""
    return type(module).__dict__.get("fastbert_forward") is forward


def _bert_settings(layer: nn.Module, layer_class: type, attention_class: type):
    """(attention dropout, hidden dropout, GELU approximation, causal, head dim, scale) of a
    BERT-layout layer the lean path can run, else None."""
    m = layer._modules
    if type(layer) is not layer_class or "crossattention" in m or _hooked(layer) \
            or getattr(layer, "chunk_size_feed_forward", 0) \
            or (getattr(layer, "gradient_checkpointing", False) and layer.training):
        return None
    attention, intermediate, output = m["attention"], m["intermediate"], m["output"]
    if type(attention) is not attention_class or _hooked(attention):
        return None
    sa, so = attention._modules["self"], attention._modules["output"]
    if not (_patched_as(sa, hf_layers.self_attention_forward)
            and _patched_as(so, hf_layers.add_norm_forward)
            and _patched_as(intermediate, hf_layers.intermediate_forward)
            and _patched_as(output, hf_layers.add_norm_forward)):
        return None
    if _hooked(sa) or _hooked(so) or _hooked(intermediate) or _hooked(output):
        return None
    hidden_p = hf_layers.output_dropout_p(so)
    if hidden_p is None or hf_layers.output_dropout_p(output) != hidden_p:
        return None
    return _attention_settings(sa, hidden_p,
                               hf_layers.gelu_approximate(intermediate.intermediate_act_fn))


def _distilbert_settings(block: nn.Module):
    """The same for a DistilBERT TransformerBlock (its FFN runs inside the patched block)."""
    m = block._modules
    if not _patched_as(block, hf_layers.distilbert_block_forward) or _hooked(block) \
            or (getattr(block, "gradient_checkpointing", False) and block.training):
        return None
    sa, ffn = m["attention"], m["ffn"]
    if not _patched_as(sa, hf_layers.distilbert_attention_forward) or _hooked(sa) \
            or _hooked(ffn):
        return None
    hidden_p = hf_layers.output_dropout_p(ffn)
    if hidden_p is None:
        return None
    return _attention_settings(sa, hidden_p, hf_layers.gelu_approximate(ffn.activation))


def _attention_settings(sa: nn.Module, hidden_p: float, approximate: Optional[str]) -> tuple:
    d = sa.attention_head_size
    return (hf_layers._dropout_p(sa), hidden_p, approximate,
            bool(getattr(sa, "is_causal", False)), d, getattr(sa, "scaling", d ** -0.5))


def plan(encoder: nn.Module, x: torch.Tensor, packed: Optional[PackedBatch],
         key_mask: Optional[torch.Tensor], kwargs: dict) -> Optional[lean.Plan]:
    """The plan for one forward of a patched encoder on x ((T, C) packed with `packed`, or
    (B, S, C) with an optional (B, S) bool key mask), or None where the modules must serve it."""
    layout = getattr(encoder, "fastbert_lean_layer", None)  # ("bert", Layer, Attention) or
    if layout is None:                                       # ("distilbert",), set by patch_hf
        return None
    layers = list(encoder._modules["layer"]._modules.values())
    if (not layers or getattr(encoder, "gradient_checkpointing", False) and encoder.training
            or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()
            or torch.autograd._profiler_enabled() or type(x) is not torch.Tensor
            or x.numel() == 0 or lean.global_hooks()):
        return None
    if key_mask is not None and (type(key_mask) is not torch.Tensor
                                 or key_mask.device != x.device):
        return None
    bert = layout[0] == "bert"
    settings = [_bert_settings(layer, *layout[1:]) if bert else _distilbert_settings(layer)
                for layer in layers]
    if settings[0] is None or settings.count(settings[0]) != len(settings):
        return None
    sa = layers[0].attention.self if bert else layers[0].attention
    if hf_layers.wants_probabilities(sa, kwargs):
        return None
    attn_p, hidden_p, approximate, causal, head_dim, scale = settings[0]
    ffn_in = layers[0].intermediate.dense if bert else layers[0].ffn.lin1
    ffn = getattr(ffn_in, "out_features", None)  # a LoRA wrapper has it too
    if not isinstance(ffn, int) or not _weights_of_dtype(layers, bert, x.dtype):
        return None

    def fused_weights():
        modules = []
        for layer in layers:
            m = layer._modules
            if bert:
                modules += [m["attention"]._modules["output"]._modules["LayerNorm"],
                            m["output"]._modules["LayerNorm"], m["intermediate"]._modules["dense"]]
            else:
                modules += [m["sa_layer_norm"], m["output_layer_norm"], m["ffn"]._modules["lin1"]]
        return [m for m in modules  # those the fused ops take (with a weight and a bias)
                if (type(m) is nn.Linear or base_class(type(m)) is nn.LayerNorm)
                and m._parameters.get("weight") is not None  # (pruned: not a Parameter)
                and m._parameters.get("bias") is not None]

    p = lean.resolve(x.device, x.dtype, x.shape[-1], packed, key_mask, causal, attn_p,
                     hidden_p, approximate, head_dim, ffn, False, fused_weights,
                     x.numel() // max(x.shape[-1], 1))
    if p is not None:
        p.scale = scale  # transformers' own value (head_dim ** -0.5), bit for bit
    return p


def run(encoder: nn.Module, x: torch.Tensor, p: lean.Plan) -> torch.Tensor:
    """Every layer of the encoder on the plan. Each layer gets its input in a list it empties,
    and drops every temporary once read (del), so the next large output can take its memory:
    otherwise the forward's peak grows, and the allocator returns and re-faults that much memory
    (a page fault per 4 KB) on every forward."""
    forward = layer_forward if encoder.fastbert_lean_layer[0] == "bert" else distilbert_forward
    carry = [x]
    del x
    for layer in encoder._modules["layer"]._modules.values():
        carry = [forward(layer, carry, p)]
    return carry[0]


def _weights_of_dtype(layers, bert: bool, dtype: torch.dtype) -> bool:
    """Plain projections hold weights of the layers' input dtype (the CPU GEMM route is chosen for
    it once per forward)."""
    for layer in layers:
        m = layer._modules
        if bert:
            attention = m["attention"]._modules
            parents = (attention["self"], attention["output"], m["intermediate"], m["output"])
        else:
            parents = (m["attention"], m["ffn"])
        for parent in parents:
            for child in parent._modules.values():
                # no weight Parameter: torch.nn.utils.prune or the old weight_norm made it an
                # attribute their pre-hook sets, so the module must be called
                if type(child) is nn.Linear and ("weight" not in child._parameters
                                                 or child._parameters["weight"].dtype != dtype):
                    return False
    return True


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not lean._hooked(module)


def _qkv(p: lean.Plan, sa: nn.Module, projections, x: torch.Tensor):
    """hf_layers._qkv on the plan: (..., nh, hd) query, key and value."""
    d = sa.attention_head_size
    if (p.grad and _plain_linear(projections[0]) and _plain_linear(projections[1])
            and _plain_linear(projections[2])
            and len({t._parameters["bias"] is None for t in projections}) == 1
            and hf_layers._wants_grad(projections, x)):  # (*)
        w, b = hf_layers._fused_qkv_weight(projections)
        y = F.linear(x, w, b) if p.train_linear is None else p.train_linear(x, w, b)
        return y.view(*x.shape[:-1], 3, -1, d).unbind(-3)
    # each projection's GEMM on its weights as they are, or its module call (lean.linear)
    return tuple(lean.linear(p, x, t).view(*x.shape[:-1], -1, d) for t in projections)


def _add_norm(p: lean.Plan, x, residual, norm: nn.Module, dropout_p: float):
    """hf_layers._add_norm on the plan."""
    if base_class(type(norm)) is nn.LayerNorm and not lean._hooked(norm) \
            and norm._parameters["weight"] is not None and norm._parameters["bias"] is not None:
        return lean._add_layer_norm(p, x, residual, norm, dropout_p, p.norm, p.norm_backend)
    return norm(F.dropout(x, dropout_p, training=dropout_p > 0) + residual)


def _feed_forward_in(p: lean.Plan, h, dense: nn.Module, activation):
    """activation(dense(h)), one linear_bias_gelu where hf_layers fuses it."""
    if p.approximate is not None and _plain_linear(dense) \
            and dense._parameters["bias"] is not None:
        return lean.linear_bias_gelu(p, h, dense)
    return activation(lean.linear(p, h, dense))


def layer_forward(layer: nn.Module, carry: list, p: lean.Plan) -> torch.Tensor:
    """A patched BERT-layout layer's forward on the plan: carry [x], x (T, C) packed or
    (B, S, C), emptied here (run) -> the same shape."""
    x, = carry
    del carry[:]
    m = layer._modules
    attention = m["attention"]._modules
    sm = attention["self"]._modules
    q, k, v = _qkv(p, attention["self"], (sm["query"], sm["key"], sm["value"]), x)
    y = lean.attention(p, q, k, v).flatten(-2)
    del q, k, v
    so = attention["output"]._modules
    a = lean.linear(p, y, so["dense"])
    del y
    h = _add_norm(p, a, x, so["LayerNorm"], p.hidden_p)
    del a, x
    intermediate = m["intermediate"]
    f = _feed_forward_in(p, h, intermediate._modules["dense"], intermediate.intermediate_act_fn)
    out = m["output"]._modules
    a = lean.linear(p, f, out["dense"])
    del f
    return _add_norm(p, a, h, out["LayerNorm"], p.hidden_p)


def distilbert_forward(block: nn.Module, carry: list, p: lean.Plan) -> torch.Tensor:
    """hf_layers.distilbert_block_forward on the plan (no dropout after out_lin); carry as
    layer_forward's."""
    x, = carry
    del carry[:]
    m = block._modules
    sa = m["attention"]
    sm = sa._modules
    q, k, v = _qkv(p, sa, (sm["q_lin"], sm["k_lin"], sm["v_lin"]), x)
    y = lean.attention(p, q, k, v).flatten(-2)
    del q, k, v
    a = lean.linear(p, y, sm["out_lin"])
    del y
    h = _add_norm(p, a, x, m["sa_layer_norm"], 0.0)
    del a, x
    ffn = m["ffn"]
    f = _feed_forward_in(p, h, ffn._modules["lin1"], ffn.activation)
    a = lean.linear(p, f, ffn._modules["lin2"])
    del f
    return _add_norm(p, a, h, m["output_layer_norm"], p.hidden_p)
