"""The lean eager path of ModernBERT's pre-norm layers (issue 22): fastbert/lean.py's plan for
patch_hf's packed ModernBertModel forward (fastbert/hf_patch_modernbert.py) and for fastbert's own
pre-norm BertModel on packed tokens (fastbert/prenorm.py).

Each layer calls four public fused ops (apply_rotary, attention_varlen with the layer's window,
linear_geglu, add_layer_norm's pre-norm form; where the attention backend turns q and k itself,
rotary= (Triton, torch's banded path: varlen.rotary_in_kernel), apply_rotary is not called) and
model.linear per projection; each public op checks its arguments, resolves a backend and reads
the autocast state on every call. Within one forward all of that is the same for every layer, so
the forward resolves it once and one function per layer calls the chosen backends directly:

    p = plan(model, x, packed, local)         # patch_hf's; None: _packed_layer's public ops
    x = run(model, x, p, rotary)              # every layer, then final_norm
    p = prenorm_plan(model, x, packed)        # fastbert's own; None: PreNormLayer.forward
    x = prenorm_run(model, x, p, rotary)

Per call remains lean.py's rule (*): an op records autograd when grad mode is on and one of its
inputs requires grad, through ops.apply_eager with the op's registered forward, setup_context and
backward; otherwise the backend's forward runs (the CPU inference GEMM for plain projections).
Seeds are drawn at the same points, so outputs, gradients and dropout are bitwise the public
ops' (tests/test_hf_lean_modernbert.py). What the layers decide per module (a plain nn.Linear /
LayerNorm / Dropout, else a module call: a LoRA wrapper, a hooked module) is still decided per
call. Submodules and parameters are read from _modules / _parameters (nn.Module.__getattr__'s
Python call saved).

The plans return None under torch.compile tracing, functorch transforms, a listening profiler,
global module hooks, tensor subclasses, an empty batch, heads of different sizes, an activation
linear_geglu does not fuse, or plain projections whose weights are not of the input's dtype;
plan also for a layer that runs through its module call (module_called: hooked, wrapped or
checkpointed), prenorm_plan for hooked, wrapped or subclassed layers and checkpointing.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastbert import cpu, cpu_train, geglu, hf_layers, layer_norm, lean, ops, rotary, varlen
from fastbert.padding import PackedBatch


class Plan:
    """Everything the layers of one forward share, resolved once."""
    __slots__ = ("grad", "cast", "dtype", "cpu_linear", "cu_seqlens", "max_seqlen", "scale",
                 "positions", "rotary", "rotary_backend", "attention", "norms", "norm",
                 "norm_backend", "geglu", "geglu_cpu", "geglu_backend", "approximate",
                 "zero_bias", "local_window", "train_linear", "deterministic")


def _plain_norm(norm: nn.Module) -> bool:
    """hf_layers.plain(norm, nn.LayerNorm) with a weight (global hooks are checked by plan)."""
    return ((type(norm) is nn.LayerNorm or hf_layers.base_class(type(norm)) is nn.LayerNorm)
            and not norm._forward_hooks and not norm._forward_pre_hooks
            and norm._parameters["weight"] is not None)


def module_called(layer: nn.Module) -> bool:
    """Whether a layer runs through its own module call (its patched forward, _layer_forward):
    hooks on it or on its attention or MLP (FSDP2's per-layer sharding among them), or module
    hooks set for every module, so they fire as in transformers' own forward; gradient
    checkpointing in training, so transformers' GradientCheckpointingLayer runs it with the
    model's own checkpoint function and kwargs; a layer whose class patch_hf did not give
    (wrapped after patching)."""
    from fastbert.hf_lean import _hooked  # hf_lean -> hf_layers -> model imports this module
    m = layer._modules
    return (not type(layer).__dict__.get("fastbert_patched") or _hooked(layer)
            or _hooked(m["attn"]) or _hooked(m["mlp"]) or lean.global_hooks()
            or (layer.training and getattr(layer, "gradient_checkpointing", False)))


def _window(attn: nn.Module, local: int) -> int:
    """flash-attn's window of a layer: the config's sliding_window as the model has it now (the
    attention module's own copy is made at construction; transformers' sdpa path reads the
    config's at every call), -1 for a global layer."""
    return local if attn.sliding_window is not None else -1


def _plannable(x: torch.Tensor, packed: PackedBatch) -> bool:
    """What every plan needs: eager plain tensors, no profiler or global hooks, tokens."""
    cu = packed.cu_seqlens
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or torch.autograd._profiler_enabled() or lean.global_hooks()
                or type(x) is not torch.Tensor or x.numel() == 0 or x.dim() != 2
                or type(cu) is not torch.Tensor or cu.device != x.device)


def _weights_of(dtype: torch.dtype, projections) -> bool:
    """Plain projections hold weights of the layers' input dtype (the CPU GEMM route is chosen
    for it once per forward)."""
    for linear in projections:
        if type(linear) is nn.Linear:
            params = linear._parameters
            # no weight Parameter: prune or the old weight_norm set it from a pre-hook
            if "weight" not in params or "bias" not in params:
                return False
            w, b = params["weight"], params["bias"]
            if w.dtype != dtype or (b is not None and b.dtype != dtype):
                return False
    return True


def plan(model: nn.Module, x: torch.Tensor, packed: PackedBatch, local: int) -> Optional[Plan]:
    """The plan for one forward of a patched ModernBertModel on its packed embeddings x (T, C),
    or None where _packed_layer's public ops must serve it. local: the config's sliding_window
    (read once per forward by the caller)."""
    layers = list(model._modules["layers"]._modules.values())
    if not layers or not _plannable(x, packed):
        return None
    # the GELU of the layers' own activation modules (one may have been replaced), the same in all
    approximate = hf_layers.gelu_approximate(layers[0]._modules["mlp"]._modules["act"])
    if approximate is None:
        return None
    dtype = x.dtype
    head_dim = layers[0]._modules["attn"].head_dim
    attention = set()  # (window, attention dropout) of the layers
    norm_dropout = {0.0}  # the dropouts the pre-norm adds apply
    norms, wi = [model._modules["final_norm"]], None
    deterministic = False  # the config's deterministic_flash_attn, each attention's copy of it
    for layer in layers:
        if module_called(layer):
            return None  # the layer runs through its module call (hf_patch_modernbert._layers)
        m = layer._modules
        attn, mlp = m["attn"], m["mlp"]._modules
        am = attn._modules
        if attn.head_dim != head_dim or hf_layers.gelu_approximate(mlp["act"]) != approximate:
            return None
        attention.add((_window(attn, local), attn.attention_dropout if attn.training else 0.0))
        deterministic = deterministic or attn.deterministic_flash_attn
        drop = am["out_drop"]
        if type(drop) is nn.Dropout:
            norm_dropout.add(drop.p if drop.training else 0.0)
        if not _weights_of(dtype, (am["Wqkv"], am["Wo"], mlp["Wi"], mlp["Wo"])):
            return None
        if type(mlp["Wi"]) is nn.Linear:
            wi = mlp["Wi"]
        norms += [m["attn_norm"], m["mlp_norm"]]
    p = _resolve(x, packed, approximate, head_dim, head_dim ** -0.5, attention, norm_dropout,
                 norms, wi, deterministic)
    if p is not None:
        p.local_window = local
    return p


def _resolve(x: torch.Tensor, packed: PackedBatch, approximate: str, head_dim: int,
             scale: float, attention: set, norm_dropout: set, norms: list,
             wi: Optional[nn.Linear], deterministic: bool) -> Optional[Plan]:
    """The plan of a forward whose layers the caller checked: attention: the layers'
    (window, attention dropout) pairs; norm_dropout: the dropouts of the pre-norm adds; norms:
    the layers' norms; wi: a plain GeGLU input projection (its shape), or None; deterministic:
    attention backward without atomics (the config's deterministic_flash_attn)."""
    device, dtype, cu = x.device, x.dtype, packed.cu_seqlens
    norms = [n for n in norms if n is not None and _plain_norm(n)]
    p = Plan()
    p.grad = torch.is_grad_enabled()
    p.cast = ops._autocast_dtype(device)
    p.dtype = compute = p.cast or dtype
    p.approximate = approximate
    p.cu_seqlens, p.max_seqlen = cu.contiguous(), int(packed.max_seqlen)
    p.scale = scale
    p.deterministic = bool(deterministic)
    # apply_rotary's positions for the (1, T, 2H, D) layout both layers turn
    p.positions = torch.arange(x.shape[0], device=device).view(1, -1)
    p.rotary_backend = ops.resolve_backend(rotary.OP, "auto", device, dtype=compute,
                                           head_dim=head_dim)
    p.rotary = ops._backend_module(p.rotary_backend).apply_rotary
    p.attention = {}
    for window, dropout_p in attention:
        kw = ops.window_kw((window, window))
        backend = ops.resolve_backend(varlen.OP, "auto", device, dtype=compute,
                                      head_dim=head_dim, dropout_p=dropout_p, causal=False, **kw)
        p.attention[window, dropout_p] = (backend, varlen._impl(backend).attention_varlen_forward,
                                          kw)
    hidden = x.shape[1]
    p.norms = {}
    norm_dtype = layer_norm.norm_dtype(device.type, dtype) if p.cast is not None else dtype
    for dropout_p in norm_dropout:
        backend = ops.resolve_backend("fastbert.add_layer_norm", "auto", device,
                                      dtype=norm_dtype, hidden=hidden, dropout_p=dropout_p,
                                      store_sum=True)
        p.norms[dropout_p] = (backend, ops._backend_module(backend).add_layer_norm_forward)
    p.norm_backend = ops.resolve_backend("fastbert.add_layer_norm", "auto", device,
                                         dtype=norm_dtype, hidden=hidden, dropout_p=0.0)
    p.norm = ops._backend_module(p.norm_backend).add_layer_norm_forward
    routes = cpu.inference_routes(dtype) if device.type == "cpu" else None
    p.cpu_linear = routes[0] if routes is not None else None
    # CPU training GEMMs (fastbert/cpu_train.py) where the rows make the route pay
    p.train_linear = cpu_train.linear_nd if (
        p.grad and x.shape[0] >= cpu_train.MIN_ROWS and device.type == "cpu") else None
    p.geglu_backend, p.geglu, p.geglu_cpu = "torch", None, None
    if wi is not None:
        w = wi._parameters["weight"]
        p.geglu_backend = ops.resolve_backend(geglu.OP, "auto", device, dtype=compute,
                                              in_features=w.shape[1], out_features=w.shape[0])
        p.geglu = geglu.forward_for_inference(p.geglu_backend)  # called without grad only
        p.geglu_cpu = p.cpu_linear if p.geglu_backend == "torch" else None
    # a bias-free LayerNorm gets the zero bias the public op makes per call, made once
    p.zero_bias = None
    for norm in norms:
        w = norm._parameters["weight"]
        if norm._parameters["bias"] is None:
            if p.zero_bias is None:
                p.zero_bias = torch.zeros_like(w)
            elif w.dtype != p.zero_bias.dtype or w.shape != p.zero_bias.shape:
                return None
    backends = {p.geglu_backend, p.norm_backend} | {b for b, _ in p.norms.values()}
    if backends != {"torch"}:
        # the Triton kernels take contiguous weights (the public ops make them so)
        for module in norms + ([wi] if wi is not None else []):
            if not all(t is None or t.is_contiguous() for t in module._parameters.values()):
                return None
    return p


def run(model: nn.Module, x: torch.Tensor, p: Plan, rotary_tables: dict) -> torch.Tensor:
    """Every layer, then final_norm, on the plan: the patched forward's loop (hf_patch_modernbert).
    rotary_tables: layer type -> (cos, sin) (T, D / 2)."""
    carry = [x, None]  # (x, delta), handed over so that layer_forward can drop them when read
    del x
    for layer in model._modules["layers"]._modules.values():
        cos, sin = rotary_tables[layer.attention_type]
        carry = layer_forward(layer, carry, p, cos, sin)
    return _norm(p, model._modules["final_norm"], *carry)


def prenorm_plan(model: nn.Module, x: torch.Tensor, packed: PackedBatch) -> Optional[Plan]:
    """The plan for one packed forward of fastbert's own pre-norm BertModel (prenorm.py's
    PreNormLayers) on its embeddings x (T, C), or None where the layers' public ops serve it."""
    from fastbert.prenorm import PreNormLayer  # prenorm.py builds on model.py, which imports us
    layers = list(model._modules["encoder"]._modules["layer"]._modules.values())
    if not layers or not _plannable(x, packed) or (model.checkpointing_function is not None
                                                   and model.training and torch.is_grad_enabled()):
        return None
    first = layers[0]
    approximate, head_dim, dtype = first.gelu_approximate, first.head_dim, x.dtype
    if approximate not in ("none", "tanh"):
        return None  # linear_geglu says what is wrong
    attention, norm_dropout, norms, wi = set(), {0.0}, [model._modules["final_norm"]], None
    deterministic = False
    for layer in layers:
        if type(layer) is not PreNormLayer or lean._hooked(layer) \
                or layer.gelu_approximate != approximate or layer.head_dim != head_dim:
            return None  # the layer is called as a module
        m = layer._modules
        attn_p = layer.attn_dropout if layer.training else 0.0
        attention.add((layer.window, attn_p))
        deterministic = deterministic or layer.deterministic
        norm_dropout.add(attn_p)
        if not _weights_of(dtype, (m["qkv"], m["attn_out"], m["ffn_in"], m["ffn_out"])):
            return None
        if type(m["ffn_in"]) is nn.Linear:
            wi = m["ffn_in"]
        norms += [m.get("attn_norm"), m["ffn_norm"]]
    return _resolve(x, packed, approximate, head_dim, 1.0 / math.sqrt(head_dim), attention,
                    norm_dropout, norms, wi, deterministic)


def prenorm_run(model: nn.Module, x: torch.Tensor, p: Plan, rotary_tables: dict):
    """Every PreNormLayer, then final_norm, on the plan (BertModel's packed loop).
    rotary_tables: prenorm.rotary_tables' theta -> (cos, sin)."""
    for layer in model._modules["encoder"]._modules["layer"]._modules.values():
        x = prenorm_layer_forward(layer, x, p, rotary_tables)
    return _norm(p, model._modules["final_norm"], x, None)


def prenorm_layer_forward(layer: nn.Module, x: torch.Tensor, p: Plan,
                          rotary_tables: dict) -> torch.Tensor:
    """PreNormLayer.forward on packed tokens on the plan: the same ops in the same order."""
    m = layer._modules
    training = layer.training
    attn_p = layer.attn_dropout if training else 0.0
    t, nh, hd = x.shape[0], layer.n_head, layer.head_dim
    # every temporary dropped once read, as layer_forward explains
    qkv = _linear(p, _norm(p, m.get("attn_norm"), x, None), m["qkv"]).view(t, 3, nh, hd)
    cos, sin = rotary_tables[layer.rope_theta]
    qk, v = qkv.split([2, 1], dim=-3)
    del qkv
    tables = _fused_rotary(p, qk, layer.window, attn_p, cos, sin)
    if tables is None:
        qk = _rotary(p, qk.reshape(1, -1, 2 * nh, hd), cos, sin).view(t, 2, nh, hd)
    q, k = qk.unbind(-3)
    del qk
    y = _attention(p, q, k, v.squeeze(-3), layer.window, attn_p, tables)
    del q, k, v
    a = _linear(p, y.flatten(-2), m["attn_out"])
    del y
    h, x = _add_norm(p, m["ffn_norm"], a, x, attn_p)
    del a
    f = _geglu(p, m["ffn_in"], h)
    del h
    if training and layer.hidden_dropout > 0.0:
        f = torch.dropout(f, layer.hidden_dropout, True)  # what F.dropout calls
    return x + _linear(p, f, m["ffn_out"])


def layer_forward(layer: nn.Module, carry: list, p: Plan, cos: torch.Tensor,
                  sin: torch.Tensor) -> list:
    """hf_patch_modernbert._packed_layer on the plan: the same ops in the same order. carry: [x,
    delta] (delta None before layer 0), emptied here; returns the next layer's."""
    # Each tensor is dropped once read (del, and the caller's carry emptied), so that the next
    # large output can take its memory: otherwise the forward's peak grows, and the allocator
    # returns and re-faults that much memory (a page fault per 4 KB) on every forward.
    x, delta = carry
    del carry[:]
    m = layer._modules
    attn = m["attn"]
    am = attn._modules
    t, d = x.shape[0], attn.head_dim
    if delta is None:
        h = _norm(p, m["attn_norm"], x, None)
    else:
        h, x = _add_norm(p, m["attn_norm"], delta, x, 0.0)
    del delta
    qkv = _linear(p, h, am["Wqkv"])
    del h
    qkv = qkv.view(t, 3, qkv.shape[-1] // (3 * d), d)  # (T, 3, H, D); T may be 0
    qk, v = qkv.split([2, 1], dim=1)
    del qkv
    window = p.local_window if attn.sliding_window is not None else -1  # _window
    attn_p = attn.attention_dropout if attn.training else 0.0
    tables = _fused_rotary(p, qk, window, attn_p, cos, sin)
    if tables is None:
        qk = _rotary(p, qk.flatten(1, 2)[None], cos, sin)[0].view(t, 2, qk.shape[2], d)
    q, k = qk.unbind(1)
    del qk
    y = _attention(p, q, k, v.squeeze(1), window, attn_p, tables)
    del q, k, v
    a = _linear(p, y.reshape(t, y.shape[1] * y.shape[2]), am["Wo"])  # T may be 0
    del y
    drop, dropout_p = am["out_drop"], 0.0  # fused into the add (_out_dropout's rule)
    if drop._forward_hooks or drop._forward_pre_hooks or drop._backward_hooks \
            or drop._backward_pre_hooks or type(drop) not in (nn.Dropout, nn.Identity):
        a = drop(a)
    elif type(drop) is nn.Dropout:
        dropout_p = drop.p if drop.training else 0.0
    h, x = _add_norm(p, m["mlp_norm"], a, x, dropout_p)
    del a
    mlp = m["mlp"]
    mm = mlp._modules
    f, drop = _geglu(p, mm["Wi"], h, mlp), mm["drop"]
    del h
    if type(drop) is not nn.Dropout or drop._forward_hooks or drop._forward_pre_hooks \
            or drop._backward_hooks or drop._backward_pre_hooks or drop.inplace:
        f = drop(f)
    elif drop.training and drop.p > 0.0:
        f = torch.dropout(f, drop.p, True)  # what F.dropout calls
    return [x, _linear(p, f, mm["Wo"])]


def _linear(p: Plan, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """model.linear(x, module) for 2-D x on the plan."""
    if type(module) is not nn.Linear or module._forward_hooks or module._forward_pre_hooks:
        return module(x)
    w, b = module._parameters["weight"], module._parameters["bias"]
    if p.cpu_linear is None or (p.grad and (x.requires_grad or w.requires_grad or (
            b is not None and b.requires_grad))):  # (*)
        return F.linear(x, w, b) if p.train_linear is None else p.train_linear(x, w, b)
    return p.cpu_linear(x, w, b)


def _norm(p: Plan, norm: nn.Module, x: torch.Tensor, delta: Optional[torch.Tensor]):
    """norm(x) (delta None), else norm(x + delta): fastbert.add_layer_norm(delta, x, ...) for a
    plain LayerNorm, as the patched forward's first attn_norm and final_norm."""
    if norm is None or (type(norm) is nn.Identity and delta is None
                        and not norm._forward_hooks and not norm._forward_pre_hooks
                        and not norm._backward_hooks and not norm._backward_pre_hooks):
        return x  # layer 0's attn_norm (None in prenorm.py's layer)
    if not (type(norm) is nn.LayerNorm and not norm._forward_hooks  # _plain_norm(norm), inline
            and not norm._forward_pre_hooks and norm._parameters["weight"] is not None
            or _plain_norm(norm)):
        return norm(x) if delta is None else norm(x + delta)
    w, b = norm._parameters["weight"], norm._parameters["bias"]
    b = p.zero_bias if b is None else b
    if delta is None:
        x, residual = x, None
    else:
        x, residual = delta, x
    # the output dtype the public op picks under autocast
    out_dtype = layer_norm.norm_out_dtype(x, residual) if p.cast is not None else None
    if p.grad and (x.requires_grad or w.requires_grad or b.requires_grad
                   or (residual is not None and residual.requires_grad)):  # (*)
        return ops.apply_eager("fastbert::add_layer_norm", layer_norm._add_layer_norm_forward,
                               layer_norm._add_layer_norm_setup, layer_norm._add_layer_norm_grad,
                               x, residual, w, b, norm.eps, 0.0, None, p.norm_backend,
                               out_dtype)[0]
    return p.norm(x, residual, w, b, norm.eps, 0.0, 0, out_dtype=out_dtype)[0]


def _add_norm(p: Plan, norm: nn.Module, delta: torch.Tensor, x: torch.Tensor,
              dropout_p: float):
    """hf_patch_modernbert._add_norm on the plan: (norm(s), s) with s = x + dropout(delta)."""
    if not (type(norm) is nn.LayerNorm and not norm._forward_hooks  # _plain_norm(norm), inline
            and not norm._forward_pre_hooks and norm._parameters["weight"] is not None
            or _plain_norm(norm)):
        s = x + F.dropout(delta, dropout_p, dropout_p > 0.0)
        return norm(s), s
    w, b = norm._parameters["weight"], norm._parameters["bias"]
    b = p.zero_bias if b is None else b
    # the output dtype the public op picks under autocast
    out_dtype = layer_norm.norm_out_dtype(delta, x) if p.cast is not None else None
    backend, forward = p.norms[dropout_p]
    if p.grad and (delta.requires_grad or x.requires_grad or w.requires_grad
                   or b.requires_grad):  # (*)
        return ops.apply_eager("fastbert::add_layer_norm_residual",
                               layer_norm._add_layer_norm_residual_forward,
                               layer_norm._add_layer_norm_residual_setup,
                               layer_norm._add_layer_norm_residual_grad, delta, x, w, b, norm.eps,
                               dropout_p, ops._draw_seed(dropout_p), backend, out_dtype)[:2]
    seed = ops._seed_int(ops._draw_seed(dropout_p)) if dropout_p > 0.0 else 0
    y, _, _, s = forward(delta, x, w, b, norm.eps, dropout_p, seed, store_sum=True,
                         out_dtype=out_dtype)
    return y, s


def _rotary(p: Plan, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """fastbert.apply_rotary(x, cos, sin) for x (1, T, 2H, D) on the plan."""
    if x.dtype != p.dtype:  # a projection module returned another dtype: the public op decides
        return rotary.apply_rotary(x, cos, sin)
    if p.grad and x.requires_grad:  # (*)
        return ops.apply_eager("fastbert::apply_rotary", rotary._rotary, rotary._setup,
                               rotary._grad, x, cos, sin, p.positions, False, False,
                               p.rotary_backend)
    return p.rotary(x, cos, sin, p.positions, False, False)


def _fused_rotary(p: Plan, qk: torch.Tensor, window: int, dropout_p: float, cos, sin):
    """The rotary arguments of _attention when its backend turns q and k (the public layers'
    varlen.rotary_in_kernel), else None: the layer turns them with _rotary first."""
    backend = p.attention[window, dropout_p][0]
    if not varlen.turns_rotary(backend, p.grad and qk.requires_grad, qk) or \
            qk.dtype != p.dtype or \
            not varlen.rotary_pays_in_kernel((window, window)):
        return None
    positions = p.positions[0]  # row t at cos[t]
    return cos, sin, positions, positions


def _attention(p: Plan, q, k, v, window: int, dropout_p: float,
               tables: Optional[tuple] = None) -> torch.Tensor:
    """fastbert.attention_varlen(q, k, v, cu, cu, max, max, window_size=(window, window),
    dropout_p=dropout_p, softmax_scale=p.scale) on the plan; tables: _fused_rotary's (its
    rotary=(cos, sin), rotary_seqlen_offsets=cu[:-1])."""
    backend, forward, kw = p.attention[window, dropout_p]
    if p.grad and (q.requires_grad or v.requires_grad):  # (*) q, k: one rotary output
        return ops.apply_eager("fastbert::attention_varlen", varlen._varlen_forward,
                               varlen._setup, varlen._grad, q, k, v, p.cu_seqlens, p.cu_seqlens,
                               p.max_seqlen, p.max_seqlen, False, dropout_p, p.scale,
                               ops._draw_seed(dropout_p), p.deterministic, backend, window, window,
                               *(tables or ()))[0]
    seed = ops._seed_int(ops._draw_seed(dropout_p)) if dropout_p > 0.0 else 0
    if tables is not None:
        kw = dict(kw, rotary=tables)
    return forward(q, k, v, p.cu_seqlens, p.cu_seqlens, p.max_seqlen, p.max_seqlen, False,
                   dropout_p, p.scale, seed, **kw)[0]


def _geglu(p: Plan, wi: nn.Module, h: torch.Tensor, mlp: Optional[nn.Module] = None):
    """gelu(a) * g with a, g = wi(h).chunk(2) on the plan: hf_patch_modernbert._geglu (the
    activation of `mlp` where wi is called as a module) or PreNormLayer._geglu (F.gelu)."""
    if type(wi) is not nn.Linear or wi._forward_hooks or wi._forward_pre_hooks:
        act, gate = wi(h).chunk(2, dim=-1)
        if mlp is None:
            return F.gelu(act, approximate=p.approximate) * gate
        return mlp.act(act) * gate
    w, b = wi._parameters["weight"], wi._parameters["bias"]
    if p.cast is not None:
        h, w = h.to(p.cast), w.to(p.cast)
        b = b.to(p.cast) if b is not None else None
    if p.grad and (h.requires_grad or w.requires_grad
                   or (b is not None and b.requires_grad)):  # (*)
        return ops.apply_eager("fastbert::linear_geglu", geglu._forward, geglu._setup,
                               geglu._grad, h, w, b, p.approximate, p.geglu_backend)[0]
    if p.geglu_cpu is not None:  # linear_geglu's CPU inference route
        act, gate = p.geglu_cpu(h, w, b).chunk(2, dim=-1)
        return F.gelu(act, approximate=p.approximate).mul_(gate)
    return p.geglu(h, w, b, p.approximate)[0]
