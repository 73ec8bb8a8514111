"""Patching transformers encoders in place: BERT, RoBERTa, XLM-RoBERTa, ELECTRA and DistilBERT (base
models and every task head) run on fastbert's ops with their own Parameter objects.

    hf_model = fastbert.patch_hf(hf_model)     # same weights, same outputs at real tokens

transformers is imported only inside patch_hf, so importing this module stays light.
"""
from __future__ import annotations

import inspect
import math
import types
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastbert
from fastbert import hf_layers, hf_lean
from fastbert.heads import span_loss
from fastbert.hf_layers import base_class, key_padding_mask
from fastbert.model import _can_pack_data_dependent
from fastbert.padding import PackedBatch, pack_mask, pack_position_ids

# attention implementations whose masks reach the layers as something other than a tensor or None
_UNSERVED_ATTENTION = {"flex_attention": "its layers receive a BlockMask, not a padding mask"}


# --------------------------------------------------------------------------------------------
# the encoder: packed sequences and padded batches run unpadded
# --------------------------------------------------------------------------------------------

def _packing(encoder, hidden_states, attention_mask, args, kwargs, unpad: bool):
    """How the encoder's layers should see this batch: a PackedBatch, or None for the original
    padded loop.
    - Packed input (batch 1, as transformers' DataCollatorWithFlattening makes it): explicit
      cu_seq_lens_q/max_length_q, or position_ids restarting per sequence; always run per sequence
      (both modes), as transformers' flash-attention path does.
    - unpad: a padded batch's real tokens (from the mask the model hands its layers), unless a
      row starts with padding (heads read position 0, pack_mask's refuse_left_padding) or the
      call needs every layer's padded output (hidden states / attentions requested)."""
    b, t = hidden_states.shape[:2]
    cross = [a for a in (*args, kwargs.get("encoder_hidden_states")) if a is not None]
    if (kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
            or kwargs.get("use_cache") or cross):
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if b != 1 or (cu_k is not None and cu_k is not cu and not torch.equal(cu_k, cu)):
            raise ValueError(f"patch_hf: packed input with cu_seq_lens_q expects hidden states of "
                             f"batch 1 and cu_seq_lens_k equal to cu_seq_lens_q (self-attention), "
                             f"got batch {b}")
        max_length = kwargs.get("max_length_q") or t
        return PackedBatch(cu.to(torch.int32), int(max_length), batch=1, seqlen=t)
    if not _can_pack_data_dependent():
        return None
    mask = key_padding_mask(attention_mask)
    position_ids = kwargs.get("position_ids", kwargs.get("fastbert_position_ids"))
    if (position_ids is not None and b == 1 and t > 1 and position_ids.numel() == t
            and (mask is None or bool(mask.all()))):
        return pack_position_ids(position_ids, t)  # one sync: the sequence count
    config = _config_of(encoder)
    wants_layers = any(kwargs.get(f, getattr(config, f, False))
                       for f in ("output_hidden_states", "output_attentions"))
    if not unpad or mask is None or wants_layers or mask.shape != hidden_states.shape[:2]:
        return None
    return pack_mask(mask, refuse_left_padding=True)


def _eager_rows_of_padding(encoder, attention_mask) -> bool:
    """Whether a padded batch has a row of padding only under transformers' eager attention,
    whose mask (the dtype's minimum added to every score) lets that row's queries attend to all
    keys alike; fastbert's attention gives them zeros, as sdpa does. Such a batch runs
    transformers' attention. One host read, on eager models' padded path only (not while
    torch.compile traces: there fastbert's zeros stay)."""
    if getattr(_config_of(encoder), "_attn_implementation", None) != "eager" \
            or torch.compiler.is_compiling():
        return False
    mask = key_padding_mask(attention_mask)
    return mask is not None and mask.dim() == 2 and not bool(mask.any(1).all())


def _encoder_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """*Encoder.forward / DistilBERT's Transformer.forward. Packed batches (see _packing) run every
    layer on the real tokens only, padded outputs repadded with zeros. Where no layer needs its
    module call (fastbert/hf_lean.py's plan), each layer runs as one function; otherwise each is
    called as a module (so its hooks, FSDP and transformers' gradient checkpointing with the
    model's own function and kwargs all apply), with the packing passed down to the attention as
    `fastbert_packed`. A padded batch takes the same plan, else the original loop over the
    patched layers."""
    if torch.jit.is_tracing():  # a bare patched encoder (models refuse in their pre-hook)
        hf_layers.refuse_jit_trace()
    if kwargs.get("fastbert_dense_mask") or not hf_layers.serves_attention(_config_of(self)):
        # a caller's 4-D mask (its attention modules see the flag) or a custom attention function
        kwargs.pop("fastbert_position_ids", None)
        return base_class(type(self)).forward(self, hidden_states, attention_mask, *args,
                                              **kwargs)
    packed = _packing(self, hidden_states, attention_mask, args, kwargs, self.fastbert_unpad)
    kwargs.pop("fastbert_position_ids", None)
    if packed is None:
        if _eager_rows_of_padding(self, attention_mask):
            kwargs["fastbert_dense_mask"] = True  # the attention modules run transformers' own
        plan = None if kwargs.get("fastbert_dense_mask") else _lean_padded_plan(
            self, hidden_states, attention_mask, args, kwargs)
        if plan is None:
            return base_class(type(self)).forward(self, hidden_states, attention_mask, *args,
                                                  **kwargs)
        out = hf_lean.run(self, hidden_states, plan)
    else:
        out = _packed_layers(self, hidden_states, packed, kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)


def _packed_layers(encoder, hidden_states, packed: PackedBatch, kwargs):
    """The encoder's layers on the packed real tokens -> the encoder's output (zeros at padding)."""
    for name in ("cache", "past_key_values", "use_cache", "encoder_hidden_states",
                 "encoder_attention_mask"):
        kwargs.pop(name, None)
    # the layers see one (1, T, C) sequence of tokens (transformers' chunked feed-forward splits
    # dim 1); position-packed input is that grid already, so captured hidden states keep its shape
    x = packed.rows(hidden_states) if packed.indices is not None else hidden_states[0]  # (T, C)
    plan = hf_lean.plan(encoder, x, packed, None, kwargs)
    if plan is not None:  # one function per layer (fastbert/hf_lean.py)
        x = hf_lean.run(encoder, x, plan)[None]
    else:
        t = x.shape[0]
        extra = _chunk_padding(encoder, t) if packed.indices is not None else 0
        rows = packed
        if extra:  # the added rows: a sequence of their own, dropped after the layers
            x = F.pad(x, (0, 0, 0, extra))
            cu = torch.cat([packed.cu_seqlens, packed.cu_seqlens[-1:] + extra])
            rows = PackedBatch(cu, max(packed.max_seqlen, extra), packed.indices, packed.batch,
                               packed.seqlen)
        x = x[None]
        for layer in encoder.layer:
            x = layer(x, None, fastbert_packed=rows, **kwargs)
        x = x[:, :t]
    return packed.grid(x[0]) if packed.indices is not None else x


def _chunk_padding(encoder, t: int) -> int:
    """Rows to add to a padded batch's T real tokens so that each layer's chunked feed-forward
    (chunk_size_feed_forward > 0: transformers splits the sequence dim and needs a multiple)
    divides them."""
    chunk = 1
    for layer in encoder.layer:  # DistilBERT keeps it on the block's FFN
        size = getattr(layer, "chunk_size_feed_forward", 0) or getattr(
            getattr(layer, "ffn", None), "chunk_size_feed_forward", 0)
        if size:
            chunk = math.lcm(chunk, size)
    return -t % chunk


def _lean_padded_plan(encoder, hidden_states, attention_mask, args, kwargs):
    """hf_lean's plan for a batch the original loop would run padded, where that loop returns
    only the last hidden state (no cache, cross-attention or per-layer outputs), else None."""
    if getattr(encoder, "fastbert_lean_layer", None) is None or any(
            a is not None for a in args) or any(
            kwargs.get(k) is not None for k in ("cache", "past_key_values",
                                                "encoder_hidden_states")) or any(
            kwargs.get(k) not in (None, False) for k in ("use_cache", "output_hidden_states")):
        return None
    if getattr(_config_of(encoder), "output_hidden_states", False):
        return None
    if attention_mask is not None and type(attention_mask) is not torch.Tensor:
        return None
    return hf_lean.plan(encoder, hidden_states, None, key_padding_mask(attention_mask), kwargs)


def _mark_dense_mask(module, args, kwargs):
    """Forward pre-hook of each family's base model: a mask of more than two dims from the caller
    (per-query structure: block-diagonal packing, a custom pattern) is no padding mask, so this
    call's encoder and attention modules run transformers' own forward; fastbert_dense_mask
    reaches them through transformers' **kwargs. (Hooks, not patched classes: transformers keys
    its output capturing on the model class's name.) Under torch.jit.trace it refuses the call."""
    if torch.jit.is_tracing():
        hf_layers.refuse_jit_trace()
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if type(mask) is torch.Tensor and mask.dim() > 2:
        kwargs["fastbert_dense_mask"] = True
    return args, kwargs


def _distilbert_pre_hook(module, args, kwargs):
    """_mark_dense_mask for DistilBertModel, which also hands its Transformer no position_ids:
    they are passed along, so packed input is recognised there."""
    position_ids = kwargs.get("position_ids", args[3] if len(args) > 3 else None)
    if position_ids is not None:
        kwargs["fastbert_position_ids"] = position_ids
    return _mark_dense_mask(module, args, kwargs)


_pass_position_ids = _distilbert_pre_hook  # its earlier name, which older pickles refer to


_span_loss_warned = False


def _warn_once_of_masked_span_loss(real: Optional[torch.Tensor]) -> None:
    """The first span loss over a batch with padding says how it differs from transformers' (which
    counts padding positions in the start/end softmax); checked until said once."""
    global _span_loss_warned
    if _span_loss_warned or real is None or torch.compiler.is_compiling() or bool(real.all()):
        return
    _span_loss_warned = True
    warnings.warn("fastbert.patch_hf: the question-answering loss of a padded batch leaves padding "
                  "positions out of the start/end softmax (unpadded, their logits are the "
                  "classifier's bias) and ignores a label at padding; transformers' loss counts "
                  "them. The BERT family's patch_hf(model, unpad=False) gives transformers' "
                  "loss.", stacklevel=5)  # the caller of the model


def _question_answering_forward(self, *args, start_positions=None, end_positions=None,
                                **kwargs):
    """*ForQuestionAnswering.forward, unpadded: the span loss never picks a padding position (its
    logit is the classifier's bias there, as the encoder output is zero), so padding is masked out
    of the start/end softmax and a label at padding is ignored like one outside the sequence."""
    original = base_class(type(self)).forward
    return_dict = kwargs.pop("return_dict", None)
    out = original(self, *args, return_dict=True, **kwargs)
    if start_positions is not None and end_positions is not None:
        bound = inspect.signature(original).bind(self, *args, **kwargs).arguments
        mask = bound.get("attention_mask")
        real = mask.bool() if mask is not None and mask.dim() == 2 else None
        out["loss"] = span_loss(out.start_logits, out.end_logits, start_positions,
                                end_positions, real)
        _warn_once_of_masked_span_loss(real)
        out = type(out)(**{"loss": out["loss"], **{k: v for k, v in out.items() if k != "loss"}})
    if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict",
                                                                     True)):
        return out.to_tuple()
    return out


# --------------------------------------------------------------------------------------------
# the families and patch_hf
# --------------------------------------------------------------------------------------------

@dataclass
class _Family:
    """One architecture's module classes (from its own modeling file) and what each becomes."""
    name: str
    encoder: type
    attention: type  # the self-attention class: head size, mask and interface checks
    forwards: dict = field(default_factory=dict)  # class inside the encoder -> patched forward
    pre_hooks: dict = field(default_factory=dict)  # class around the encoder -> forward pre-hook
    question_answering: Optional[type] = None  # its span-QA head (masked span loss, unpadded)
    lean_layer: Optional[tuple] = None  # how hf_lean recognises its layers: ("bert", Layer,
    #                                     Attention) or ("distilbert",)


def _bert_layout(name: str, module, prefix: str) -> _Family:
    def cls(role: str) -> type:  # e.g. RobertaSelfOutput, from modeling_roberta itself
        return getattr(module, prefix + role)
    return _Family(name, cls("Encoder"), cls("SelfAttention"),
                   {cls("Encoder"): _encoder_forward,
                    cls("SelfAttention"): hf_layers.self_attention_forward,
                    cls("SelfOutput"): hf_layers.add_norm_forward,
                    cls("Output"): hf_layers.add_norm_forward,
                    cls("Intermediate"): hf_layers.intermediate_forward},
                   {cls("Model"): _mark_dense_mask},
                   question_answering=cls("ForQuestionAnswering"),
                   lean_layer=("bert", cls("Layer"), cls("Attention")))


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
        _Family("DistilBERT", distil.Transformer, distil_attention,
                {distil.Transformer: _encoder_forward,
                 distil_attention: hf_layers.distilbert_attention_forward,
                 distil.TransformerBlock: hf_layers.distilbert_block_forward},
                {distil.DistilBertModel: _distilbert_pre_hook},
                question_answering=distil.DistilBertForQuestionAnswering,
                lean_layer=("distilbert",)),
    ]


_patched_classes: dict = {}  # (original class, forward) -> its Fastbert subclass


def _patched_class(base: type, forward) -> type:
    key = (base, forward)
    if key not in _patched_classes:
        # the original's __module__: transformers reads it (is_custom_code: a class outside
        # transformers initialises missing weights another way in from_pretrained)
        _patched_classes[key] = type(f"Fastbert{base.__name__}", (base,), {
            "forward": _with_signature_of(forward, base.forward), "fastbert_forward": forward,
            "fastbert_patched": True, "__reduce_ex__": _reduce_patched,
            "__module__": base.__module__})
    return _patched_classes[key]


def _with_signature_of(forward, original):
    """A copy of `forward` that inspect.signature sees as `original` (transformers and its tests
    read a model's forward signature, e.g. for inputs_embeds or output_attentions); the call
    itself costs nothing extra."""
    copy = types.FunctionType(forward.__code__, forward.__globals__, forward.__name__,
                              forward.__defaults__, forward.__closure__)
    copy.__kwdefaults__ = forward.__kwdefaults__
    copy.__doc__, copy.__qualname__ = forward.__doc__, forward.__qualname__
    copy.__signature__ = inspect.signature(original)
    return copy


def _reduce_patched(self, protocol):
    """Pickle (torch.save, deepcopy) a patched module as its original class plus the patched
    forward, both importable by name, and its state: it loads back patched, in any process."""
    kind = type(self)
    return _rebuild_patched, (kind.__mro__[1], kind.fastbert_forward), self.__dict__.copy()


def _rebuild_patched(base: type, forward) -> nn.Module:
    return object.__new__(_patched_class(base, forward))


def _patch(module: nn.Module, forward) -> None:
    """Give `module` a subclass of its class whose forward is `forward` (parameters untouched)."""
    module.__class__ = _patched_class(base_class(type(module)), forward)


def _new_attention_api(family: _Family) -> bool:
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
        if family is not None and not _new_attention_api(family):
            import transformers
            problems.append(f"{where(name, module)}: transformers {transformers.__version__}'s "
                            f"{family.name} layers have the pre-5.0 interface (patch_hf needs "
                            f"transformers >= 5.0: pip install -U transformers)")
        if family is not None:
            implementation = getattr(_config_of(module), "_attn_implementation", None)
            if implementation in _UNSERVED_ATTENTION:
                problems.append(f"{where(name, module)}: attn_implementation={implementation!r}: "
                                f"{_UNSERVED_ATTENTION[implementation]}")
        head_dim = getattr(module, "attention_head_size", None)
        if (any(base_class(type(module)) is f.attention for _, f in encoders)
                and head_dim > fastbert.ops.MAX_HEAD_DIM):
            problems.append(f"{where(name, module)}: head dim {head_dim} is over fastbert's "
                            f"{fastbert.ops.MAX_HEAD_DIM}")
    return problems


def patch_hf(model: nn.Module, unpad: bool = True) -> nn.Module:
    """Run a transformers BERT, RoBERTa, XLM-RoBERTa, ELECTRA or DistilBERT (the base model or any
    task head) on fastbert's ops, in place: self-attention on fastbert.attention (one fused QKV
    GEMM in training), every residual+LayerNorm on fastbert.add_layer_norm, the FFN's first Linear+GELU on
    fastbert.linear_bias_gelu (other activations stay as they are). The Parameter objects stay the
    same, so an optimizer made before patching keeps training the model. Returns the model.

    Each call decides: the fused paths serve plain nn.Linear / nn.LayerNorm modules only; a LoRA
    wrapper, a quantized linear or a hooked module (attached before or after patching) is called
    as a module. output_attentions=True returns the real probabilities (that call's attention runs
    the reference math). Packed input (batch 1 with position_ids restarting per sequence, or
    cu_seq_lens_q, as DataCollatorWithFlattening makes it) runs each sequence on its own.

    unpad: the encoder runs on the real tokens only (packed once per forward, attention by
    fastbert.attention_varlen) and repads its output with zeros, so hidden states at padding
    positions are zeros instead of values computed from padding tokens; outputs at real tokens
    are unchanged. A batch with a row that starts with padding runs padded instead (heads read
    position 0: transformers' numbers there). A span-QA loss then masks padding out of the
    start/end softmax (transformers normalises over padding too; a one-time warning says so);
    unpad=False keeps transformers' loss exactly.

    Everything is checked before anything is patched: a model with no encoder of these families,
    or a module fastbert cannot serve (flex attention's BlockMask, a head dim over
    fastbert.ops.MAX_HEAD_DIM), raises ValueError/TypeError naming the module and leaves the model
    untouched; so is a model of transformers < 5 (whose layers' interface predates the one patched
    here)."""
    if not isinstance(model, nn.Module):  # e.g. a Hub name: patch_hf patches a model already loaded
        raise TypeError(f"patch_hf: expected a transformers model (an nn.Module), got "
                        f"{type(model).__name__} {model!r}; load it first, e.g. "
                        f"transformers.AutoModel.from_pretrained(folder)")
    from fastbert import hf_patch_modernbert  # ModernBERT's own layout: its own module
    if hf_patch_modernbert.models(model):
        return hf_patch_modernbert.patch(model, unpad)
    families = _families()
    encoders = [(m, f) for m in model.modules() for f in families
                if base_class(type(m)) is f.encoder]  # (module, family)
    if not encoders:
        raise TypeError(f"patch_hf: {type(model).__name__} contains no encoder fastbert serves "
                        f"(expected {', '.join(f.name for f in families)}: a base model or a task "
                        f"head)")
    problems = _problems(model, encoders)
    if problems:
        raise ValueError("patch_hf: cannot serve " + "; ".join(problems) + " (nothing was patched)")

    for encoder, family in encoders:
        _patch_encoder(encoder, family)
        encoder.fastbert_unpad = bool(unpad)
        encoder.fastbert_lean_layer = family.lean_layer
    served = {f.name: f for _, f in encoders}.values()
    for module in model.modules():
        kind = base_class(type(module))
        for family in served:
            hook = family.pre_hooks.get(kind)
            if hook is not None and hook not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(hook, with_kwargs=True)
            if unpad and kind is family.question_answering:
                _patch(module, _question_answering_forward)
        # LayerNorms outside the encoders (embeddings, heads): y = LN(x) on fastbert.add_layer_norm
        if kind is nn.LayerNorm and module.elementwise_affine and module.bias is not None:
            _patch(module, hf_layers.layer_norm_forward)
    return model


def _patch_encoder(encoder: nn.Module, family: _Family) -> None:
    for module in encoder.modules():
        kind = base_class(type(module))
        if kind in family.forwards:
            _patch(module, family.forwards[kind])
