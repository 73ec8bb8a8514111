"""The lean eager path of fastbert's own BertModel (DESIGN.md section 3, "Host path"; issue 22).

The public ops check their arguments, resolve a backend, read the autocast state and normalise
their arguments on every call. Within one model forward all of that is the same for every layer,
so BertModel resolves it once (`plan`) and each layer calls the chosen backends directly
(`layer_forward`):

    plan = lean.plan(model, ids, packed, mask)   # None: the public ops serve this forward
    x = lean.embedding_norm(plan, x, model.embeddings.LayerNorm)
    for layer in model.encoder.layer:
        x = lean.layer_forward(layer, x, plan)

Per call remains only what depends on the tensors, decided as the public ops decide it: an op
records autograd when grad mode is on and one of its inputs requires grad; it then runs through
ops._EagerOp with the op's registered forward, setup_context and backward (as the public ops'
eager calls do), otherwise the backend's forward runs directly. Seeds are drawn from torch's
generator at the same points as through the public ops, so outputs, gradients and dropout
patterns are bitwise theirs (tests/test_lean.py). (*) marks that per-call rule, written out
inline: a helper would cost Python calls on every op.

`plan` returns None -- the public ops then serve the whole forward -- under torch.compile tracing,
functorch transforms (checked once here, so autograd runs through ops.apply_eager), a listening
profiler (the public ops name each call fastbert::<op>_fwd then), tensor subclasses, inputs on
another device than the weights, an empty batch, wrapped layers, layers that are not BertLayers
(ModernBERT's pre-norm ones), or layers whose settings differ.
Submodules and parameters are read from the modules' _modules and _parameters dicts, which is
where nn.Module.__getattr__ finds them, without its Python call.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module

from fastbert import cpu, cpu_train, layer_norm, linear_gelu, ops, varlen
from fastbert.padding import PackedBatch


class Plan:
    """Everything the layers of one forward share, resolved once."""
    __slots__ = ("grad", "cast", "hooks", "direct", "packed", "mask", "cu_seqlens", "max_seqlen",
                 "causal", "attn_p", "hidden_p", "scale", "approximate", "attention",
                 "attention_backend", "norm", "norm_backend", "embed_norm", "embed_norm_backend",
                 "gelu_backend", "cpu_linear", "cpu_gelu", "train_linear")


def _layer_settings(layer) -> Optional[tuple]:
    m = layer._modules
    if "attn_norm" not in m or "ffn_norm" not in m or "ffn_in" not in m:
        return None  # a wrapped layer
    if type(m["attn_norm"]) is not nn.LayerNorm or type(m["ffn_norm"]) is not nn.LayerNorm \
            or type(m["ffn_in"]) is not nn.Linear:
        return None  # replaced: the public path reads what these modules offer
    training = layer.training
    return (layer.causal, layer.attn_dropout if training else 0.0,
            layer.hidden_dropout if training else 0.0, layer.gelu_approximate, layer.head_dim,
            layer.n_head, training)


def _hooked(module: nn.Module) -> bool:
    """Whether calling the module runs hooks of its own (what nn.Module.__call__ checks)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def global_hooks() -> bool:
    """Whether nn.Module hooks registered for every module are set."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def plan(model, ids: torch.Tensor, packed: Optional[PackedBatch],
         attention_mask: Optional[torch.Tensor]) -> Optional[Plan]:
    """The plan for one forward of a BertModel on token ids ((T,) packed with `packed`, or
    (B, S) with an optional bool key mask), or None where the public ops must serve it."""
    from fastbert.model import BertLayer  # model.py imports this module: look it up now
    layers = list(model._modules["encoder"]._modules["layer"]._modules.values())
    if not all(isinstance(layer, BertLayer) for layer in layers):
        return None  # pre-norm layers (ModernBERT's) run on the public ops
    embeddings = model._modules["embeddings"]._modules
    weight = embeddings["word_embeddings"]._parameters["weight"]
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch.autograd._profiler_enabled() or type(ids) is not torch.Tensor
            or type(weight) is not nn.Parameter or ids.numel() == 0 or not layers
            or type(embeddings["LayerNorm"]) is not nn.LayerNorm):
        return None
    index = packed.cu_seqlens if packed is not None else attention_mask
    if ids.device != weight.device or (index is not None and (
            type(index) is not torch.Tensor or index.device != weight.device)):
        return None  # the public ops say what is wrong
    settings = _layer_settings(layers[0])
    for layer in layers:
        if settings is None or _layer_settings(layer) != settings:
            return None
    causal, attn_p, hidden_p, approximate, head_dim, _, _ = settings
    hooked = False
    for layer in layers:
        hooked = hooked or _hooked(layer)

    def fused_weights():
        norms = [model.embeddings.LayerNorm]
        for layer in layers:
            norms += [layer.attn_norm, layer.ffn_norm, layer.ffn_in]
        return norms

    return resolve(weight.device, weight.dtype, weight.shape[1], packed, attention_mask,
                   bool(causal), attn_p, hidden_p, approximate, head_dim,
                   model.config.intermediate_size, hooked, fused_weights, ids.numel())


def resolve(device: torch.device, x_dtype: torch.dtype, hidden: int,
            packed: Optional[PackedBatch],
            attention_mask: Optional[torch.Tensor], causal: bool, attn_p: float,
            hidden_p: float, approximate: Optional[str], head_dim: int, ffn: int,
            hooked_layers: bool, fused_weights: Callable[[], list], rows: int) -> Optional[Plan]:
    """The plan of a forward whose layers were checked by the caller (this module's `plan`, or
    fastbert/hf_lean.py for a patched transformers encoder): the backends and CPU GEMM routes, or
    None where a fused weight is not contiguous for a GPU backend. fused_weights() lists the
    modules whose weight and bias go to fused kernels (norms, the FFN's first linear).
    x_dtype: the layers' input (the embeddings' output) before autocast; rows: its token rows."""
    p = Plan()
    p.grad = torch.is_grad_enabled()
    p.cast = ops._autocast_dtype(device)
    dtype = p.cast or x_dtype
    p.hooks = global_hooks()
    # no hooks on any layer either: the caller may run layer_forward without the module call
    p.direct = not p.hooks and not hooked_layers
    p.causal, p.attn_p, p.hidden_p, p.approximate = causal, attn_p, hidden_p, approximate
    p.scale = 1.0 / math.sqrt(head_dim)
    p.packed = packed is not None
    kw = dict(dtype=dtype, head_dim=head_dim, dropout_p=attn_p, causal=causal)
    if p.packed:
        p.cu_seqlens, p.max_seqlen, p.mask = packed.cu_seqlens.contiguous(), packed.max_seqlen, None
        p.attention_backend = ops.resolve_backend(varlen.OP, "auto", device, **kw)
        p.attention = varlen._impl(p.attention_backend).attention_varlen_forward
    else:
        p.mask = attention_mask.contiguous() if attention_mask is not None else None
        p.cu_seqlens = p.max_seqlen = None
        p.attention_backend = ops.resolve_backend("fastbert.attention", "auto", device,
                                                  has_mask=p.mask is not None, **kw)
        p.attention = ops._backend_module(p.attention_backend).attention_forward
    norm_dtype = (layer_norm.norm_dtype(device.type, x_dtype) if p.cast is not None
                  else x_dtype)
    p.norm_backend = ops.resolve_backend("fastbert.add_layer_norm", "auto", device,
                                         dtype=norm_dtype, hidden=hidden, dropout_p=hidden_p)
    p.norm = ops._backend_module(p.norm_backend).add_layer_norm_forward
    p.embed_norm_backend = ops.resolve_backend("fastbert.add_layer_norm", "auto", device,
                                               dtype=norm_dtype, hidden=hidden, dropout_p=0.0)
    p.embed_norm = ops._backend_module(p.embed_norm_backend).add_layer_norm_forward
    p.gelu_backend = ops.resolve_backend("fastbert.linear_bias_gelu", "auto", device, dtype=dtype,
                                         in_features=hidden, out_features=ffn)
    # CPU inference GEMMs (fastbert/cpu.py), for the calls that record no autograd
    routes = cpu.inference_routes(x_dtype) if device.type == "cpu" else None
    p.cpu_linear, p.cpu_gelu = routes if routes is not None else (None, None)
    # CPU training GEMMs (fastbert/cpu_train.py) where the rows make the route pay
    p.train_linear = cpu_train.linear_nd if (
        p.grad and rows >= cpu_train.MIN_ROWS and device.type == "cpu") else None
    if p.gelu_backend != "torch":
        p.cpu_gelu = None
    if {p.norm_backend, p.embed_norm_backend, p.gelu_backend} != {"torch"}:
        # the Triton and CUDA kernels take contiguous weights (the public ops make them so)
        if not all(t is None or t.is_contiguous() for n in fused_weights()
                   for t in (n._parameters["weight"], n._parameters.get("bias"))):
            return None
    return p


def linear(p: Plan, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """module(x), as model.linear computes it for a plain nn.Linear (the CPU inference GEMM where
    no autograd is recorded, else F.linear); a wrapped or hooked projection runs as a module."""
    if type(module) is not nn.Linear or p.hooks or module._forward_hooks \
            or module._forward_pre_hooks or module._backward_hooks \
            or module._backward_pre_hooks:  # _hooked(module), inline: a call per projection
        return module(x)
    w, b = module._parameters["weight"], module._parameters["bias"]
    if p.cpu_linear is None or (p.grad and (x.requires_grad or w.requires_grad
                                            or (b is not None and b.requires_grad))):  # (*)
        return F.linear(x, w, b) if p.train_linear is None else p.train_linear(x, w, b)
    if p.packed:
        return p.cpu_linear(x, w, b)
    return p.cpu_linear(x.reshape(-1, x.shape[-1]), w, b).view(*x.shape[:-1], w.shape[0])


def _add_layer_norm(p: Plan, x, residual, norm: nn.LayerNorm, dropout_p: float, forward,
                    backend: str):
    """fastbert.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, dropout_p=...)."""
    # the output dtype the public op picks under autocast
    out_dtype = layer_norm.norm_out_dtype(x, residual) if p.cast is not None else None
    shape = x.shape
    if not p.packed:
        x = x.reshape(-1, shape[-1])
        residual = residual.reshape(-1, shape[-1]) if residual is not None else None
    w, b = norm._parameters["weight"], norm._parameters["bias"]
    if p.grad and (x.requires_grad or w.requires_grad or b.requires_grad
                   or (residual is not None and residual.requires_grad)):  # (*)
        y = ops.apply_eager("fastbert::add_layer_norm", layer_norm._add_layer_norm_forward,
                            layer_norm._add_layer_norm_setup, layer_norm._add_layer_norm_grad,
                            x, residual, w, b, float(norm.eps), dropout_p,
                            ops._draw_seed(dropout_p), backend, out_dtype)[0]
    else:
        seed = ops._seed_int(ops._draw_seed(dropout_p)) if dropout_p > 0.0 else 0
        y = forward(x, residual, w, b, float(norm.eps), dropout_p, seed, out_dtype=out_dtype)[0]
    return y if p.packed else y.view(shape)


def embedding(p: Optional[Plan], ids: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """module(ids); on a plan, for a plain nn.Embedding, F.embedding's own call (max_norm
    unset)."""
    if p is None or type(module) is not nn.Embedding or module.max_norm is not None or p.hooks \
            or _hooked(module):
        return module(ids)
    padding_idx = module.padding_idx if module.padding_idx is not None else -1
    return torch.embedding(module._parameters["weight"], ids, padding_idx,
                           module.scale_grad_by_freq, module.sparse)


def embedding_norm(p: Plan, x, norm: nn.LayerNorm):
    """fastbert.add_layer_norm(x, None, norm.weight, norm.bias, norm.eps) on the embeddings."""
    return _add_layer_norm(p, x, None, norm, 0.0, p.embed_norm, p.embed_norm_backend)


def linear_bias_gelu(p: Plan, x, module: nn.Linear):
    """fastbert.linear_bias_gelu(x, module.weight, module.bias, approximate=p.approximate)."""
    w, b = module._parameters["weight"], module._parameters["bias"]
    if p.cast is not None:
        x, w, b = x.to(p.cast), w.to(p.cast), b.to(p.cast)
    shape = x.shape
    if not p.packed:
        x = x.reshape(-1, shape[-1])
    if p.grad and (x.requires_grad or w.requires_grad or b.requires_grad):  # (*)
        y = ops.apply_eager("fastbert::linear_bias_gelu", linear_gelu._linear_bias_gelu_forward,
                            linear_gelu._linear_bias_gelu_setup,
                            linear_gelu._linear_bias_gelu_grad, x, w, b,
                            p.approximate, True, p.gelu_backend)[0]
    elif p.cpu_gelu is not None:
        y = p.cpu_gelu(x, w, b, p.approximate)
    else:
        y = linear_gelu._linear_bias_gelu_forward(x, w, b, p.approximate, False,
                                                  p.gelu_backend)[0]
    return y if p.packed else y.view(*shape[:-1], -1)


def attention(p: Plan, q, k, v):
    """fastbert.attention_varlen(q, k, v, cu, cu, max, max, ...) on packed tokens, else
    fastbert.attention(q, k, v, mask, ...), both with the layer's causal flag and dropout."""
    if p.cast is not None and q.dtype != p.cast:
        q, k, v = q.to(p.cast), k.to(p.cast), v.to(p.cast)
    dropout_p = p.attn_p
    if p.grad and q.requires_grad:  # (*) q, k and v are views of one tensor
        seed = ops._draw_seed(dropout_p)
        if p.packed:
            return ops.apply_eager("fastbert::attention_varlen", varlen._varlen_forward,
                                   varlen._setup, varlen._grad, q, k, v, p.cu_seqlens,
                                   p.cu_seqlens, p.max_seqlen, p.max_seqlen, p.causal, dropout_p,
                                   p.scale, seed, False, p.attention_backend, -1, -1)[0]
        return ops.apply_eager("fastbert::attention", ops._attention_forward,
                               ops._attention_setup, ops._attention_grad, q, k, v, p.mask,
                               p.causal, dropout_p, p.scale, seed, False, p.attention_backend,
                               -1, -1)[0]
    seed = ops._seed_int(ops._draw_seed(dropout_p)) if dropout_p > 0.0 else 0
    if p.packed:
        return p.attention(q, k, v, p.cu_seqlens, p.cu_seqlens, p.max_seqlen, p.max_seqlen,
                           p.causal, dropout_p, p.scale, seed)[0]
    return p.attention(q, k, v, p.mask, p.causal, dropout_p, p.scale, seed)[0]


def layer_forward(layer, x: torch.Tensor, p: Plan) -> torch.Tensor:
    """BertLayer.forward on the plan: the same ops in the same order (see BertLayer)."""
    # every temporary dropped once read, as fastbert/hf_lean.py's run explains
    m = layer._modules
    qkv = linear(p, x, m["qkv"]).view(*x.shape[:-1], 3, layer.n_head, layer.head_dim)
    q, k, v = qkv.unbind(-3)
    del qkv
    y = attention(p, q, k, v).flatten(-2)
    del q, k, v
    a = linear(p, y, m["attn_out"])
    del y
    h = _add_layer_norm(p, a, x, m["attn_norm"], p.hidden_p, p.norm, p.norm_backend)
    del a
    f = linear_bias_gelu(p, h, m["ffn_in"])
    a = linear(p, f, m["ffn_out"])
    del f
    return _add_layer_norm(p, a, h, m["ffn_norm"], p.hidden_p, p.norm, p.norm_backend)
