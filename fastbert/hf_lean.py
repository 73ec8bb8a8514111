"""The lean eager path of a patched transformers encoder (issue 22): fastbert/lean.py's plan, for
the BERT-layout families patch_hf serves (BERT, RoBERTa, XLM-RoBERTa, ELECTRA).

A patched layer is five module calls deep (Layer -> Attention -> SelfAttention / SelfOutput,
Intermediate, Output), each through nn.Module.__call__ and transformers' wrappers, and each fused
op re-checks its arguments. When nothing in a layer needs those calls -- the modules are exactly
the classes patch_hf made, none has a hook, no gradient checkpointing, no chunked feed-forward, no
attention probabilities asked for -- the encoder checks that once per forward (`plan`) and runs
each layer as one function (`layer_forward`) on lean.py's direct backend calls:

    plan = hf_lean.plan(encoder, x, packed, mask, kwargs)   # None: the modules serve it
    for layer in encoder.layer:
        x = hf_lean.layer_forward(layer, x, plan)

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


def _layer_settings(layer: nn.Module, layer_class: type, attention_class: type):
    """(attention dropout, hidden dropout, GELU approximation, causal) of a layer the lean path
    can run, else None."""
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
    hidden_p = hf_layers._dropout_p(so)
    if hf_layers._dropout_p(output) != hidden_p:
        return None
    d = sa.attention_head_size
    return (hf_layers._dropout_p(sa), hidden_p,
            getattr(intermediate, "fastbert_gelu_approximate", None),
            bool(getattr(sa, "is_causal", False)), d, getattr(sa, "scaling", d ** -0.5))


def plan(encoder: nn.Module, x: torch.Tensor, packed: Optional[PackedBatch],
         key_mask: Optional[torch.Tensor], kwargs: dict) -> Optional[lean.Plan]:
    """The plan for one forward of a patched encoder on x ((T, C) packed with `packed`, or
    (B, S, C) with an optional (B, S) bool key mask), or None where the modules must serve it."""
    classes = getattr(encoder, "fastbert_lean_layer", None)
    if classes is None:
        return None  # a family without the BERT layout (DistilBERT)
    layers = list(encoder._modules["layer"]._modules.values())
    if (not layers or getattr(encoder, "gradient_checkpointing", False) and encoder.training
            or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch.autograd._profiler_enabled() or type(x) is not torch.Tensor
            or x.numel() == 0 or lean.global_hooks()):
        return None
    if key_mask is not None and (type(key_mask) is not torch.Tensor
                                 or key_mask.device != x.device):
        return None
    settings = _layer_settings(layers[0], *classes)
    if settings is None or hf_layers.wants_probabilities(layers[0].attention.self, kwargs):
        return None
    for layer in layers[1:]:
        if _layer_settings(layer, *classes) != settings:
            return None
    attn_p, hidden_p, approximate, causal, head_dim, scale = settings
    ffn = layers[0].intermediate.dense.out_features if type(
        layers[0].intermediate.dense) is nn.Linear else None
    if ffn is None or not _weights_of_dtype(layers, x.dtype):
        return None

    def fused_weights():
        modules = []
        for layer in layers:
            modules += [layer.attention.output.LayerNorm, layer.output.LayerNorm,
                        layer.intermediate.dense]
        return [m for m in modules if type(m) is nn.Linear
                or (base_class(type(m)) is nn.LayerNorm and m.bias is not None)]

    p = lean.resolve(x.device, x.dtype, x.shape[-1], packed, key_mask, causal, attn_p,
                     hidden_p, approximate, head_dim, ffn, False, fused_weights)
    if p is not None:
        p.scale = scale  # transformers' own value (head_dim ** -0.5), bit for bit
    return p


def _weights_of_dtype(layers, dtype: torch.dtype) -> bool:
    """Plain projections hold weights of the layers' input dtype (the CPU GEMM route is chosen for
    it once per forward)."""
    for layer in layers:
        attention = layer._modules["attention"]._modules
        for parent in (attention["self"], attention["output"], layer._modules["intermediate"],
                       layer._modules["output"]):
            for child in parent._modules.values():
                if type(child) is nn.Linear and child._parameters["weight"].dtype != dtype:
                    return False
    return True


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not lean._hooked(module)


def _qkv(p: lean.Plan, sa: nn.Module, x: torch.Tensor):
    """hf_layers._qkv on the plan: (..., nh, hd) query, key and value."""
    m = sa._modules
    projections = (m["query"], m["key"], m["value"])
    d = sa.attention_head_size
    if (_plain_linear(projections[0]) and _plain_linear(projections[1])
            and _plain_linear(projections[2])
            and len({t._parameters["bias"] is None for t in projections}) == 1):
        w, b = hf_layers._fused_qkv_weight(sa, projections)
        if p.cpu_linear is None or (p.grad and (x.requires_grad or w.requires_grad
                                                or (b is not None and b.requires_grad))):  # (*)
            qkv = F.linear(x, w, b)
        elif x.dim() == 2:
            qkv = p.cpu_linear(x, w, b)
        else:
            qkv = p.cpu_linear(x.reshape(-1, x.shape[-1]), w, b).view(*x.shape[:-1], -1)
        return qkv.view(*x.shape[:-1], 3, -1, d).unbind(-3)
    return tuple(t(x).view(*x.shape[:-1], -1, d) for t in projections)


def _add_norm(p: lean.Plan, x, residual, norm: nn.Module):
    """hf_layers._add_norm on the plan."""
    if base_class(type(norm)) is nn.LayerNorm and not lean._hooked(norm) \
            and norm._parameters["weight"] is not None and norm._parameters["bias"] is not None:
        return lean._add_layer_norm(p, x, residual, norm, p.hidden_p, p.norm, p.norm_backend)
    return norm(F.dropout(x, p.hidden_p, training=p.hidden_p > 0) + residual)


def layer_forward(layer: nn.Module, x: torch.Tensor, p: lean.Plan) -> torch.Tensor:
    """The patched layer's forward on the plan: x (T, C) packed or (B, S, C) -> the same shape."""
    m = layer._modules
    attention = m["attention"]._modules
    q, k, v = _qkv(p, attention["self"], x)
    y = lean.attention(p, q, k, v).flatten(-2)
    so = attention["output"]._modules
    h = _add_norm(p, lean.linear(p, y, so["dense"]), x, so["LayerNorm"])
    intermediate = m["intermediate"]
    dense = intermediate._modules["dense"]
    if p.approximate is not None and _plain_linear(dense) \
            and dense._parameters["bias"] is not None:
        f = lean.linear_bias_gelu(p, h, dense)
    else:
        f = intermediate.intermediate_act_fn(lean.linear(p, h, dense))
    out = m["output"]._modules
    return _add_norm(p, lean.linear(p, f, out["dense"]), h, out["LayerNorm"])
