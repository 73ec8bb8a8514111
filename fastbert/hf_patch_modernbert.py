"""Patching transformers' ModernBERT in place (issue 20): ModernBertModel and every head built on
it run unpadded on fastbert's ops, with their own Parameter objects.

    hf_model = fastbert.patch_hf(hf_model)   # dispatches here for a ModernBERT model

What the patched ModernBertModel.forward computes, on the real tokens only (packed once, repadded
with zeros at the end; transformers' heads then run as they are, sparse MLM prediction included):

    x = embeddings(real tokens)                                     # LayerNorm(tok_embeddings)
    per layer:  h = attn_norm(x)                                    # Identity in layer 0
                q, k, v = Wqkv(h);  q, k = apply_rotary(q, k)       # the layer type's RoPE
                x = x + out_drop(Wo(attention_varlen(q, k, v, window_size=(w, w))))
                x = x + Wo(drop(linear_geglu(mlp_norm(x), Wi)))     # gelu(a) * g
    final_norm(x)

Each residual add runs in the same pass as the norm after it (add_layer_norm's pre-norm form,
return_residual): out_drop and the add with mlp_norm, the MLP's add with the next layer's
attn_norm (or final_norm).

A local layer's window is transformers' `sliding_window` (|i - j| <= local_attention // 2), served
in O(T * window). Decided at call time, per module (fastbert/hf_layers.py's rule): a plain
nn.Linear runs on the CPU inference GEMM path (Wi fused with the GeGLU), a plain nn.LayerNorm on
fastbert.add_layer_norm; anything else (a LoRA wrapper, a hooked module) is called as a module.
So are the layers (hf_lean_modernbert.module_called) with hooks on them, their attention or MLP
(FSDP2's sharding hooks among them), checkpointed in training (transformers' checkpointing, with
the model's own function and kwargs) or wrapped after patching: their patched forwards
(_layer_forward, _attention_forward) run the same packed computation inside the module call.
Packed input (batch 1 with cu_seq_lens_q, or position_ids restarting per sequence, as
DataCollatorWithFlattening makes it) runs each sequence on its own, as transformers' flash-attention
path does (its sdpa path lets packed sequences see each other). What the packed path does not
cover (per-layer outputs or attention weights requested, a 4-D or per-layer mask, tracing without
data-dependent shapes) runs transformers' own forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastbert
from fastbert import hf_layers, hf_lean_modernbert, varlen
from fastbert.hf_lean import _hooked as hooked
from fastbert.hf_layers import (base_class, for_every_module, gelu_approximate, hooks_see, plain,
                                serves_attention)
from fastbert.model import _can_pack_data_dependent, linear
from fastbert.padding import PackedBatch, pack_mask, pack_position_ids


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if plain(module, nn.LayerNorm) and module.weight is not None:
        return fastbert.add_layer_norm(x, None, module.weight, module.bias, module.eps)
    return module(x)


def _add_norm(module: nn.Module, delta: torch.Tensor, x: torch.Tensor, dropout_p: float):
    """(module(s), s) with s = x + dropout(delta): one fastbert.add_layer_norm pass (its pre-norm
    form) for a plain LayerNorm."""
    if plain(module, nn.LayerNorm) and module.weight is not None:
        return fastbert.add_layer_norm(delta, x, module.weight, module.bias, module.eps,
                                       dropout_p=dropout_p, return_residual=True)
    s = x + F.dropout(delta, dropout_p, dropout_p > 0.0)
    return module(s), s


def _out_dropout(drop: nn.Module, a: torch.Tensor):
    """(a, p): the attention output and the dropout the residual add applies to it (fused into
    it for a plain nn.Dropout or Identity; anything else, or one hooks would see, is called as
    a module)."""
    if not hooks_see(drop):
        if type(drop) is nn.Identity:
            return a, 0.0
        if type(drop) is nn.Dropout:
            return a, drop.p if drop.training else 0.0
    return drop(a), 0.0


def _geglu(mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """act(a) * g with a, g = Wi(h).chunk(2): fused for a plain Wi and a GELU activation module
    (the layer's own: it may have been replaced after the config was written)."""
    approximate = gelu_approximate(mlp.act)
    if approximate is not None and plain(mlp.Wi):
        return fastbert.linear_geglu(h, mlp.Wi.weight, mlp.Wi.bias, approximate=approximate)
    act, gate = mlp.Wi(h).chunk(2, dim=-1)
    return mlp.act(act) * gate


def _packed_layer(layer: nn.Module, x: torch.Tensor, delta, packed: PackedBatch,
                  cos: torch.Tensor, sin: torch.Tensor):
    """One ModernBertEncoderLayer on packed tokens whose input is x + delta (T, C); delta is the
    previous layer's MLP output not yet added (None for the first layer), so each residual add
    shares a pass with the norm after it. cos, sin (T, D / 2) per token. Returns (x, delta).
    A hooked attention or MLP is called as a module (on the packed tokens, as _layer_forward),
    as both are where hooks for every module are set."""
    attn, mlp = layer.attn, layer.mlp
    as_modules = for_every_module()
    if delta is None:
        h = _norm(layer.attn_norm, x)
    else:
        h, x = _add_norm(layer.attn_norm, delta, x, 0.0)
    if as_modules or hooked(attn):
        a, p = attn(h, position_embeddings=(cos, sin), fastbert_packed=packed)[0], 0.0
    else:
        a, p = _attend(attn, h, packed, cos, sin)
    h, x = _add_norm(layer.mlp_norm, a, x, p)
    if as_modules or hooked(mlp):
        return x, mlp(h)
    return x, linear(mlp.drop(_geglu(mlp, h)), mlp.Wo)


def _attend(attn: nn.Module, h: torch.Tensor, packed: PackedBatch, cos: torch.Tensor,
            sin: torch.Tensor):
    """ModernBertAttention on packed tokens h (T, C): (Wo's output, the dropout out_drop leaves
    to the residual add, _out_dropout's rule)."""
    t, d = h.shape[0], attn.head_dim
    qkv = linear(h, attn.Wqkv)
    qkv = qkv.view(t, 3, qkv.shape[-1] // (3 * d), d)  # (T, 3, H, D); T may be 0
    # q and k heads turned in one call: (1, T, 2H, D), row t at cos[t]; split and unbind, not
    # slices: their backward joins the gradients (a slice's fills a zero tensor and adds to it)
    qk, v = qkv.split([2, 1], dim=1)
    # flash-attn's window: the config's as it is now (hf_lean_modernbert._window)
    window = attn.config.sliding_window if attn.sliding_window is not None else -1
    dropout_p = attn.attention_dropout if attn.training else 0.0
    turn = {}
    if varlen.rotary_in_kernel(qkv, dropout_p, window=(window, window)):
        # the Triton kernel turns q and k as it loads them; row t at cos[t]: offsets cu_seqlens
        turn = dict(rotary=(cos, sin), rotary_seqlen_offsets=packed.cu_seqlens[:-1])
    else:
        qk = fastbert.apply_rotary(qk.flatten(1, 2)[None], cos, sin)[0].view(t, 2, qk.shape[2], d)
    q, k = qk.unbind(1)
    y = fastbert.attention_varlen(q, k, v.squeeze(1), packed.cu_seqlens,
                                  packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen,
                                  window_size=(window, window), dropout_p=dropout_p,
                                  softmax_scale=d ** -0.5,
                                  deterministic=attn.deterministic_flash_attn, **turn)
    return _out_dropout(attn.out_drop, linear(y.reshape(t, y.shape[1] * y.shape[2]), attn.Wo))


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                       fastbert_packed=None, **kwargs):
    """ModernBertAttention.forward. From a patched layer (fastbert_packed: the PackedBatch) on
    packed tokens hidden_states (T, C), position_embeddings its (cos, sin) (T, D / 2): (output,
    None), out_drop applied; transformers' own forward otherwise."""
    if fastbert_packed is None:
        return base_class(type(self)).forward(self, hidden_states, position_embeddings,
                                             attention_mask, **kwargs)
    a, p = _attend(self, hidden_states, fastbert_packed, *position_embeddings)
    return (F.dropout(a, p, True) if p > 0.0 else a), None


def _pack(model: nn.Module, attention_mask, position_ids, kwargs, batch: int, seqlen: int,
          device, local: int) -> Optional[PackedBatch]:
    """The real tokens as packed sequences (hf_patch._packing's rules for packed input); None
    for a mask with padding between real tokens where a local layer's window is shorter than the
    rows (transformers' window counts positions, which packing would close up), or with a row
    that starts with padding (cls pooling reads position 0): such a batch runs transformers'
    forward. local: the config's sliding_window."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and batch == 1:
        return PackedBatch(cu.to(torch.int32), int(kwargs.get("max_length_q") or seqlen),
                           batch=1, seqlen=seqlen)
    if attention_mask is not None:  # one host sync answers holes, padding and the token count
        short = local < seqlen - 1 and "sliding_attention" in model.config.layer_types
        packed = pack_mask(attention_mask, whole_grid=True, refuse_holes=short,
                           refuse_left_padding=True)
        if packed is None or packed.indices is not None:
            return packed
    if position_ids is not None and batch == 1 and seqlen > 1:
        return pack_position_ids(position_ids, seqlen)  # one sync: the sequence count
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen
    return PackedBatch(cu, seqlen, batch=batch, seqlen=seqlen)


def _layer_forward(self, hidden_states, attention_mask=None, position_embeddings=None,
                   fastbert_packed=None, **kwargs):
    """ModernBertEncoderLayer.forward. From the patched model's forward (fastbert_packed:
    (packed, cos, sin)) on its packed tokens hidden_states (1, T, C): the layer's
    output (1, T, C), both residual adds done; transformers' own forward otherwise."""
    if fastbert_packed is None:
        return base_class(type(self)).forward(self, hidden_states, attention_mask=attention_mask,
                                             position_embeddings=position_embeddings, **kwargs)
    x, delta = _packed_layer(self, hidden_states[0], None, *fastbert_packed)
    return x[None] + delta[None]  # a new tensor, not a view (FSDP2 warns of a layer's views)


def _layers(model: nn.Module, x: torch.Tensor, packed: PackedBatch, rotary: dict):
    """Every layer on the public ops, then final_norm."""
    delta = None  # the last layer's MLP output, added to x by the next norm's pass
    for layer in model.layers:
        cos, sin = rotary[layer.attention_type]
        if hf_lean_modernbert.module_called(layer):
            if delta is not None:  # the layer's input is a tensor: the pending add is made
                x, delta = x + delta, None
            x = layer(x[None], fastbert_packed=(packed, cos, sin))[0]
        else:
            x, delta = _packed_layer(layer, x, delta, packed, cos, sin)
    norm = model.final_norm
    if delta is None:
        return _norm(norm, x)
    if plain(norm, nn.LayerNorm) and norm.weight is not None:
        return fastbert.add_layer_norm(delta, x, norm.weight, norm.bias, norm.eps)
    return norm(x + delta)


def _model_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                   inputs_embeds=None, **kwargs):
    """ModernBertModel.forward, unpadded (see the module docstring)."""
    if torch.jit.is_tracing():
        hf_layers.refuse_jit_trace()
    config = self.config
    wants_layers = any(kwargs.get(f, getattr(config, f, False))
                       for f in ("output_hidden_states", "output_attentions"))
    grid = input_ids if input_ids is not None else inputs_embeds
    local = config.sliding_window  # read per call, as transformers' sdpa path does
    packed = None
    if not (wants_layers or (input_ids is None) == (inputs_embeds is None)
            or (attention_mask is not None and (not torch.is_tensor(attention_mask)
                                                or attention_mask.shape != grid.shape[:2]))
            or not _can_pack_data_dependent() or not serves_attention(config)):
        packed = _pack(self, attention_mask, position_ids, kwargs, *grid.shape[:2], grid.device,
                       local)
    if packed is None:
        return base_class(type(self)).forward(self, input_ids=input_ids,
                                             attention_mask=attention_mask,
                                             position_ids=position_ids,
                                             inputs_embeds=inputs_embeds, **kwargs)
    from transformers.modeling_outputs import BaseModelOutput
    batch, seqlen = grid.shape[:2]
    if position_ids is None:
        position_ids = torch.arange(seqlen, device=grid.device).unsqueeze(0)
    positions = packed.rows(position_ids.expand(batch, seqlen))  # (T,)
    if input_ids is not None:  # embed the real tokens only
        x = self.embeddings(input_ids=packed.rows(input_ids)[None])[0]
    else:
        x = self.embeddings(inputs_embeds=packed.rows(inputs_embeds)[None])[0]
    half = config.hidden_size // config.num_attention_heads // 2
    rotary = {}  # layer type -> (cos, sin) (T, D / 2), from the model's own rotary module
    for layer_type in set(config.layer_types):
        cos, sin = self.rotary_emb(x, positions[None], layer_type)  # (1, T, D): halves repeated
        rotary[layer_type] = (cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous())
    plan = hf_lean_modernbert.plan(self, x, packed, local)
    if plan is not None:  # the same ops, backends resolved once (hf_lean_modernbert.py)
        x = hf_lean_modernbert.run(self, x, plan, rotary)
    else:
        x = _layers(self, x, packed, rotary)
    out = BaseModelOutput(last_hidden_state=packed.grid(x))
    return out if kwargs.get("return_dict", getattr(config, "return_dict", True)) else out.to_tuple()


def models(model: nn.Module) -> list:
    """The ModernBertModel modules inside `model` (itself, or a head's .model)."""
    try:
        from transformers.models.modernbert import modeling_modernbert
    except ImportError:  # a transformers without ModernBERT
        return []
    base = modeling_modernbert.ModernBertModel
    return [m for m in model.modules() if isinstance(m, base)]


def _problems(found: list) -> list:
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    problems = []
    for m in found:
        config = m.config
        if not hasattr(config, "rope_parameters"):  # transformers 4.x: another module layout
            problems.append(f"{type(m).__name__}: transformers {transformers.__version__}'s "
                            f"ModernBERT predates the 5.0 layout patch_hf serves (patch_hf "
                            f"needs transformers >= 5.0: pip install -U transformers)")
            continue
        head_dim = config.hidden_size // config.num_attention_heads
        if head_dim > fastbert.ops.MAX_HEAD_DIM:
            problems.append(f"{type(m).__name__}: head dim {head_dim} is over fastbert's "
                            f"{fastbert.ops.MAX_HEAD_DIM}")
        for layer_type, params in (config.rope_parameters or {}).items():
            kind = (params or {}).get("rope_type", "default")
            if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
                problems.append(f"{type(m).__name__}: unknown rope type {kind!r} for "
                                f"{layer_type} layers")
    return problems


def _patch_keeping_output_capture(model: nn.Module) -> None:
    """hf_patch's picklable patched class, registered for transformers' output capture (which
    keys a model's recordable outputs, hidden states and attentions, by class name) as its
    original is, so transformers' own forward still returns them when asked."""
    from fastbert.hf_patch import _patch
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without output capture: nothing to register
        _CAN_RECORD_REGISTRY = None
    recordable = _CAN_RECORD_REGISTRY.get(model) if _CAN_RECORD_REGISTRY is not None else None
    _patch(model, _model_forward)
    if recordable:
        _CAN_RECORD_REGISTRY[model] = recordable


def patch(model: nn.Module, unpad: bool = True) -> nn.Module:
    """patch_hf for a model holding ModernBertModel(s): checks everything, then patches each
    one's forward (parameters untouched). Returns the model."""
    found = models(model)
    if not unpad:
        raise ValueError("patch_hf: ModernBERT runs unpadded only (unpad=False is not offered: "
                         "its local layers would need transformers' padded sliding mask)")
    problems = _problems(found)
    if problems:
        raise ValueError("patch_hf: cannot serve " + "; ".join(problems) +
                         " (nothing was patched)")
    from fastbert.hf_patch import _patch
    for m in found:
        if not type(m).__dict__.get("fastbert_patched"):
            _patch_keeping_output_capture(m)
        for layer in m.layers:
            for module, forward in ((layer, _layer_forward), (layer.attn, _attention_forward)):
                if not type(module).__dict__.get("fastbert_patched"):
                    _patch(module, forward)
    # span QA: padding masked out of the start/end softmax, as for the BERT family (unpadded)
    from transformers.models.modernbert import modeling_modernbert
    from fastbert.hf_patch import _question_answering_forward
    for m in model.modules():
        if type(m) is modeling_modernbert.ModernBertForQuestionAnswering:
            _patch(m, _question_answering_forward)
    return model
