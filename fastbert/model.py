"""The BERT encoder on fastbert's fused ops: embeddings, encoder layer, pooler, BertModel (the
config is fastbert/config.py's BertConfig, re-exported here).

Parameter names follow Hugging Face's BERT so checkpoints load as they are; the one difference is
the attention input projection, which is a single (3*hidden, hidden) GEMM here. State-dict hooks on
BertLayer split it into HF's query/key/value on save and merge them on load, so `state_dict()` and
`load_state_dict()` speak Hugging Face's key names.

Shapes: B batch, S sequence, C hidden size, nh heads, hd head dim (C = nh * hd).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn.modules import module as _module

import fastbert
from fastbert import cpu, cpu_train, lean
from fastbert.config import _GELU_APPROXIMATE, BertConfig  # noqa: F401  (re-exported)
from fastbert.family import fastbert_base_class
from fastbert.padding import (PackedBatch, first_tokens, pack_mask, pack_position_ids,
                              positions_in_sequence)


class ModelOutput:
    """Base of the output dataclasses: fields by name, or HF-style out[0] over the fields set."""

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def __getitem__(self, i):
        return getattr(self, i) if isinstance(i, str) else self.to_tuple()[i]


@dataclass
class BertModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor = None  # (B, S, C); (N, C) rows with return_packed
    pooler_output: Optional[torch.Tensor] = None  # (B, C)
    packed: Optional[PackedBatch] = None  # with return_packed: maps rows to the (B, S) grid


def plain(module: nn.Module, kind: type = nn.Linear) -> bool:
    """Exactly `kind` with no forward hooks (its own or global): its parameters can be used
    directly. Anything else (a LoRA wrapper, a quantized linear, a hooked module) must be called
    as a module."""
    return (type(module) is kind and not module._forward_hooks and not module._forward_pre_hooks
            and not _module._global_forward_hooks and not _module._global_forward_pre_hooks)


def cpu_gemm(x: torch.Tensor, weight: torch.Tensor,
             bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """x @ weight.T + bias by oneDNN's CPU inference GEMM where fastbert/cpu.py serves it (1.1-1.2x
    MKL's F.linear at 2 threads on the AVX2 dev CPU, parity at 1 thread), or its training GEMMs
    where fastbert/cpu_train.py does, else None."""
    if x.dim() == 0 or x.shape[-1] == 0:
        return None  # the module call serves it or says what is wrong
    x2 = x.reshape(-1, x.shape[-1])
    if cpu.should_use(x2, weight, bias):
        return cpu.linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])  # 0 rows too
    if cpu_train.should_use(x2, weight, bias):
        return cpu_train.linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
    return None


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """layer(x), by cpu_gemm for a plain nn.Linear where it serves."""
    y = cpu_gemm(x, layer.weight, layer.bias) if plain(layer) else None
    return layer(x) if y is None else y


def linear_gelu(x: torch.Tensor, layer: nn.Module, approximate: str) -> torch.Tensor:
    """gelu(layer(x)): one fastbert.linear_bias_gelu for a plain nn.Linear with a bias."""
    if plain(layer) and layer.bias is not None:
        return fastbert.linear_bias_gelu(x, layer.weight, layer.bias, approximate=approximate)
    return nn.functional.gelu(layer(x), approximate=approximate)


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation (as in Hugging Face), for use with module.apply."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:  # ModernBERT's are bias-free
            nn.init.zeros_(module.bias)


class BertEmbeddings(nn.Module):
    """word + position (+ segment) embeddings, LayerNorm, dropout; config.embedding_dim wide.
    Without a segment table (DistilBERT) token_type_ids are ignored, as tokenizers still make
    them for pairs; with rotary positions (ModernBERT) the layers place the tokens instead."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = config.embedding_dim
        self.word_embeddings = nn.Embedding(config.vocab_size, c, padding_idx=config.pad_token_id)
        self.rotary = config.position_embedding_type == "rotary"
        if self.rotary:  # the layers turn queries and keys by position instead (ModernBERT)
            self.position_embeddings = None
        elif config.position_embedding_type == "sinusoidal":  # fixed, not a weight: never saved
            self.position_embeddings = None
            self.register_buffer("position_table", sinusoidal_table(
                config.max_position_embeddings, c), persistent=False)
        else:  # RoBERTa: padding tokens sit at position pad_token_id, a row that never learns
            self.position_embeddings = nn.Embedding(
                config.max_position_embeddings, c,
                padding_idx=config.pad_token_id if config.position_offset else None)
        self.token_type_embeddings = (nn.Embedding(config.type_vocab_size, c)
                                      if config.type_vocab_size else None)  # DistilBERT: none
        self.LayerNorm = nn.LayerNorm(c, eps=config.layer_norm_eps,  # parameters only
                                      bias=config.setting("norm_bias", True))
        self.dropout = nn.Dropout(config.setting("embedding_dropout", config.hidden_dropout_prob))
        # Old HF checkpoints carry these buffers; they are derived from the config, not loaded.
        self._register_load_state_dict_pre_hook(_drop_buffers_from_checkpoint)

    def forward(self, input_ids, token_type_ids=None, position_ids=None, max_position=None,
                plan: Optional[lean.Plan] = None):
        """input_ids (B, S), or (T,) packed tokens with their position_ids. max_position: a
        bound on the positions known without a host sync (default S), for the sinusoidal table.
        plan: BertModel's lean.Plan for this forward (fastbert/lean.py)."""
        if position_ids is None:
            s = input_ids.shape[-1]
            position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0)  # (1, S)
        x = lean.embedding(plan, input_ids, self.word_embeddings)  # (B, S, C)
        if self.token_type_embeddings is not None:  # sums in transformers' order
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + lean.embedding(plan, token_type_ids, self.token_type_embeddings)
        if not self.rotary:
            x = x + self._positions(position_ids, max_position or input_ids.shape[-1], plan)
        if plan is not None:
            return self.dropout(lean.embedding_norm(plan, x, self.LayerNorm))
        x = fastbert.add_layer_norm(x, None, self.LayerNorm.weight, self.LayerNorm.bias,
                                    self.LayerNorm.eps)
        return self.dropout(x)

    def _positions(self, position_ids, bound: int, plan=None):
        if self.position_embeddings is not None:
            return lean.embedding(plan, position_ids, self.position_embeddings)
        if bound > self.position_table.shape[0]:  # longer than the table: extend it
            self.position_table = sinusoidal_table(bound, self.position_table.shape[1]).to(
                self.position_table.device)
        return nn.functional.embedding(position_ids, self.position_table)


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """(n_positions, dim) fp32: PE(p, 2i) = sin(p / 10000^(2i/dim)), PE(p, 2i+1) = cos(...),
    computed in fp64 (the original Transformer's fixed positional encoding)."""
    pos = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return table.float()


def _drop_buffers_from_checkpoint(state_dict, prefix, *args):
    for name in ("position_ids", "token_type_ids"):
        state_dict.pop(prefix + name, None)


class BertLayer(nn.Module):
    """One post-LN encoder layer:
        h = LN(x + Dropout(Attn(x) W_o + b_o)),  y = LN(h + Dropout(GELU(h W_1 + b_1) W_2 + b_2))
    """

    # our parameter name -> Hugging Face's (qkv is split into query/key/value separately)
    HF_NAMES = {
        "attn_out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
        "ffn_norm": "output.LayerNorm",
    }

    def __init__(self, config: BertConfig, causal: bool = False):
        super().__init__()
        c = config.hidden_size
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        self.causal = causal
        self.attn_dropout = config.attention_probs_dropout_prob
        self.hidden_dropout = config.hidden_dropout_prob
        self.gelu_approximate = config.gelu_approximate
        self.qkv = nn.Linear(c, 3 * c)  # rows: query, key, value (HF's three Linears stacked)
        self.attn_out = nn.Linear(c, c)
        self.attn_norm = nn.LayerNorm(c, eps=config.layer_norm_eps)  # parameters only
        self.ffn_in = nn.Linear(c, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, c)
        self.ffn_norm = nn.LayerNorm(c, eps=config.layer_norm_eps)  # parameters only
        self._register_state_dict_hook(_layer_state_dict_to_hf)
        self._register_load_state_dict_pre_hook(_layer_state_dict_from_hf)

    def forward(self, x, attention_mask=None, kv_cache: Optional[dict] = None,
                packed: Optional[PackedBatch] = None, plan: Optional[lean.Plan] = None):
        """x (B, S, C) padded, or (T, C) packed real tokens with `packed` saying where each
        sequence starts (then every op below sees real tokens only).
        plan: BertModel's lean.Plan for this forward; the same ops then run without per-op
        checks (fastbert/lean.py).
        kv_cache: a dict this layer keeps its keys/values in ("k", "v": (B, S_past, nh, hd)).
        Given one, x holds only the new positions; they attend to the cached ones as well, and the
        cache is extended. attention_mask then covers all S_past + S keys."""
        if plan is not None:
            return lean.layer_forward(self, x, plan)
        training = self.training
        dropout_p = self.attn_dropout if training else 0.0
        qkv = linear(x, self.qkv).view(*x.shape[:-1], 3, self.n_head, self.head_dim)
        q, k, v = qkv.unbind(-3)  # (..., 3, nh, hd) -> three (..., nh, hd) views, no copies
        if packed is not None:  # (T, nh, hd)
            y = fastbert.attention_varlen(q, k, v, packed.cu_seqlens, packed.cu_seqlens,
                                          packed.max_seqlen, packed.max_seqlen,
                                          causal=self.causal, dropout_p=dropout_p)
        else:  # (B, S, nh, hd)
            if kv_cache is not None:
                # causal attention is bottom-right aligned: the new queries (Sq < Sk) see the cache
                if "k" in kv_cache:
                    k, v = torch.cat([kv_cache["k"], k], 1), torch.cat([kv_cache["v"], v], 1)
                kv_cache["k"], kv_cache["v"] = k, v
            y = fastbert.attention(q, k, v, attention_mask, causal=self.causal, dropout_p=dropout_p)
        y = y.flatten(-2)  # (..., C)
        h = fastbert.add_layer_norm(linear(y, self.attn_out), x, self.attn_norm.weight,
                                    self.attn_norm.bias, self.attn_norm.eps,
                                    dropout_p=self.hidden_dropout if training else 0.0)
        f = linear_gelu(h, self.ffn_in, self.gelu_approximate)  # (B, S, intermediate_size)
        return fastbert.add_layer_norm(linear(f, self.ffn_out), h, self.ffn_norm.weight,
                                       self.ffn_norm.bias, self.ffn_norm.eps,
                                       dropout_p=self.hidden_dropout if training else 0.0)


def _layer_state_dict_to_hf(module, state_dict, prefix, local_metadata):
    """state_dict() hook: rename this layer's keys to HF's and split qkv into query/key/value."""
    # This layer's entries are the last ones written; re-insert them in HF's order and names.
    mine = [k for k in state_dict if k.startswith(prefix)]
    values = {k[len(prefix):]: state_dict.pop(k) for k in mine}
    weights, biases = values.pop("qkv.weight").chunk(3), values.pop("qkv.bias").chunk(3)
    for name, weight, bias in zip(("query", "key", "value"), weights, biases):
        state_dict[f"{prefix}attention.self.{name}.weight"] = weight
        state_dict[f"{prefix}attention.self.{name}.bias"] = bias
    for local, value in values.items():
        ours, kind = local.rsplit(".", 1)
        state_dict[f"{prefix}{BertLayer.HF_NAMES[ours]}.{kind}"] = value


def _layer_state_dict_from_hf(state_dict, prefix, *args):
    """load_state_dict() pre-hook: HF's keys to ours, query/key/value merged into qkv. Keys that
    are already ours (or missing) are left for load_state_dict to report."""
    for kind in ("weight", "bias"):
        parts = [f"{prefix}attention.self.{name}.{kind}" for name in ("query", "key", "value")]
        if all(p in state_dict for p in parts):
            state_dict[f"{prefix}qkv.{kind}"] = torch.cat([state_dict.pop(p) for p in parts])
    for ours, theirs in BertLayer.HF_NAMES.items():
        for kind in ("weight", "bias"):
            if f"{prefix}{theirs}.{kind}" in state_dict:
                state_dict[f"{prefix}{ours}.{kind}"] = state_dict.pop(f"{prefix}{theirs}.{kind}")


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first, plan: Optional[lean.Plan] = None):  # (B, C) [CLS] tokens -> (B, C)
        if plan is not None:
            return torch.tanh(lean.linear(plan, first, self.dense))
        return torch.tanh(linear(first, self.dense))


def _can_pack_data_dependent() -> bool:
    """Packing a padded batch makes the token count a data-dependent shape: torch.compile traces
    it only when told to capture such ops; otherwise the compiled model runs padded."""
    if not torch.compiler.is_compiling():
        return True
    return bool(getattr(torch._dynamo.config, "capture_dynamic_output_shape_ops", False))


class BertPreTrainedModel(nn.Module):
    """Common base: the config and Hugging Face checkpoint I/O (see fastbert/hf.py)."""

    base_model_prefix = "bert"

    def __init__(self, config: BertConfig):
        super().__init__()
        name = fastbert_base_class(type(self))
        if name is not None:
            config.family.architecture(name)  # raises if this model_type has no such class
        self.config = config

    @classmethod
    def from_pretrained(cls, path: str, **config_overrides):
        """Load a Hugging Face checkpoint directory (config.json + model.safetensors or
        pytorch_model.bin), offline. Keyword arguments override config fields."""
        from fastbert.hf import load_pretrained
        return load_pretrained(cls, path, **config_overrides)

    def save_pretrained(self, path: str) -> None:
        """Write config.json + model.safetensors that transformers loads as its class of our name."""
        from fastbert.hf import save_pretrained
        save_pretrained(self, path)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None,
                                      checkpointing_function=None) -> None:
        """Recompute each encoder layer in backward instead of keeping its activations, as
        transformers' method of this name does: torch.utils.checkpoint.checkpoint with
        gradient_checkpointing_kwargs (default use_reentrant=True, as there), or your own
        checkpointing_function(function, *args)."""
        kwargs = {"use_reentrant": True} if gradient_checkpointing_kwargs is None \
            else dict(gradient_checkpointing_kwargs)
        function = checkpointing_function or functools.partial(torch.utils.checkpoint.checkpoint,
                                                               **kwargs)
        for module in self.modules():
            if isinstance(module, BertModel):
                module.checkpointing_function = function

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, BertModel):
                module.checkpointing_function = None

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "checkpointing_function", None) is not None for m in self.modules())

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        every_n_layers: int = 1, offload: bool = False,
                                        checkpointing_function=None) -> None:
        """transformers >= 5.24's name for gradient_checkpointing_enable; as there, the default is
        use_reentrant=False. Every layer is checkpointed, on the device (every_n_layers > 1 and
        offload are not offered)."""
        if every_n_layers != 1 or offload:
            raise ValueError(f"{type(self).__name__}.activation_checkpointing_enable: "
                             f"every_n_layers=1 and offload=False expected (fastbert checkpoints "
                             f"every layer on the device), got every_n_layers={every_n_layers!r}, "
                             f"offload={offload!r}")
        kwargs = {"use_reentrant": False} if activation_checkpointing_kwargs is None \
            else activation_checkpointing_kwargs
        self.gradient_checkpointing_enable(kwargs, checkpointing_function)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.is_gradient_checkpointing


class BertModel(BertPreTrainedModel):
    """The encoder: embeddings, num_hidden_layers BertLayers, and (optionally) the pooler.
    As in transformers, config.is_decoder makes the self-attention causal. add_pooling_layer
    defaults to whether the family's base model has one (BERT, RoBERTa: yes). A pre-norm family
    (ModernBERT) has PreNormLayers (fastbert/prenorm.py), rotary positions and a final_norm."""

    def __init__(self, config: BertConfig, add_pooling_layer: Optional[bool] = None):
        super().__init__(config)
        if add_pooling_layer is None:
            add_pooling_layer = config.family.has_pooler
        self.embeddings = BertEmbeddings(config)
        self.embeddings_project = (nn.Linear(config.embedding_dim, config.hidden_size)
                                   if config.embedding_dim != config.hidden_size else None)
        pre_norm = config.family.pre_norm
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(
            [prenorm.PreNormLayer(config, i) if pre_norm else
             BertLayer(config, causal=config.is_decoder)
             for i in range(config.num_hidden_layers)])))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps,
                                       bias=config.setting("norm_bias", True)) \
            if pre_norm else None
        # the longest row the learned position table serves (None: sinusoidal or rotary)
        table = self.embeddings.position_embeddings
        self.longest_row = (table.num_embeddings - config.position_offset if table is not None
                            else None)
        # the narrowest sliding window (half width), or -1: none (see _pack)
        self.local_window = min((layer.window for layer in self.encoder.layer
                                 if getattr(layer, "window", -1) >= 0), default=-1)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.checkpointing_function = None  # set by gradient_checkpointing_enable
        self.apply(lambda m: init_weights(m, config.initializer_range))
        if pre_norm:  # ModernBERT's own scheme (truncated, scaled projections)
            prenorm.init_encoder(self, config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                past_key_values: Optional[list] = None, *, cu_seqlens=None,
                max_seqlen: Optional[int] = None, unpad: Optional[bool] = None,
                return_packed: bool = False):
        """input_ids (B, S); attention_mask (B, S) with 1/True for real tokens (HF convention).

        Unpadded (config.unpad, or `unpad=`): the real tokens are packed once after the mask is
        read (one host sync: their count) and every layer runs on (T, C); the output is repadded
        to (B, S, C) with zeros at padding, or, with return_packed, left as (T, C) rows with
        `out.packed` to map them back. Packed input as transformers' DataCollatorWithFlattening
        makes it -- input_ids (1, T) with position_ids restarting at 0 per sequence -- is taken
        as it is (one sync: the sequence count), and with explicit cu_seqlens (int32 (B + 1,))
        and max_seqlen with no host sync at all; its output keeps the (1, T, C) shape.
        past_key_values: one dict per layer (start with empty ones), filled and extended by each
        call, so a later call passes only the new tokens (see BertLayer; decoders only, padded)."""
        self._check_inputs(input_ids, attention_mask, position_ids, past_key_values, cu_seqlens)
        packed = self._pack(input_ids, attention_mask, position_ids, past_key_values, cu_seqlens,
                            max_seqlen, self.config.unpad if unpad is None else unpad)
        if packed is None:
            x, pooled = self._forward_padded(input_ids, attention_mask, token_type_ids,
                                             position_ids, past_key_values)
            if return_packed:  # rows of the full grid
                b, s = input_ids.shape
                x, packed = x.reshape(b * s, -1), PackedBatch(None, s, None, b, s)
            return BertModelOutput(last_hidden_state=x, pooler_output=pooled, packed=packed)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        total = packed.indices.numel() if packed.indices is not None else input_ids.numel()
        if position_ids is None:
            position_ids = (self._default_positions(input_ids) if packed.indices is not None
                            else positions_in_sequence(packed.cu_seqlens, total)
                            + self.config.position_offset)
        ids, types, pos = (packed.rows(t) for t in (input_ids, token_type_ids,
                                                     position_ids.expand_as(input_ids)))  # (T,)
        plan = lean.plan(self, ids, packed, None)
        x = self._embed(ids, types, pos, input_ids.shape[-1], plan)  # (T, C)
        rotary = self._rotary(pos, x.dtype)
        pre = hf_lean_modernbert.prenorm_plan(self, x, packed) if rotary is not None else None
        if pre is not None:  # pre-norm layers on backends resolved once (hf_lean_modernbert.py)
            x = hf_lean_modernbert.prenorm_run(self, x, pre, rotary)
        else:
            for layer in self.encoder.layer:
                x = self._run_layer(layer, x, packed=packed, plan=plan, rotary=rotary)
            x = self._final_norm(x)
        pooled = self.pooler(first_tokens(x, packed.cu_seqlens), plan) \
            if self.pooler is not None else None  # (B, C)
        if return_packed:
            return BertModelOutput(last_hidden_state=x, pooler_output=pooled, packed=packed)
        return BertModelOutput(last_hidden_state=packed.grid(x), pooler_output=pooled)

    def _check_inputs(self, input_ids, attention_mask, position_ids, past_key_values,
                      cu_seqlens) -> None:
        """What the shapes alone refuse, before anything runs: a mask of another shape than the
        ids (packing would misplace or drop rows), and a sequence longer than the learned
        position table (an embedding lookup would fail without naming it)."""
        if (attention_mask is not None and past_key_values is None
                and tuple(attention_mask.shape) != tuple(input_ids.shape)):
            raise ValueError(f"BertModel: argument 'attention_mask' expected shape "
                             f"{tuple(input_ids.shape)} like 'input_ids', got "
                             f"{tuple(attention_mask.shape)}")
        longest = self.longest_row
        if longest is not None and position_ids is None and cu_seqlens is None \
                and past_key_values is None and input_ids.shape[-1] > longest:
            raise ValueError(f"BertModel: argument 'input_ids' expected at most {longest} tokens "
                             f"a row (max_position_embeddings="
                             f"{self.config.max_position_embeddings}), got "
                             f"{input_ids.shape[-1]}")

    def _pack(self, input_ids, attention_mask, position_ids, past_key_values, cu_seqlens,
              max_seqlen, unpad: bool) -> Optional[PackedBatch]:
        """How to pack this batch, or None for the padded path."""
        if cu_seqlens is not None:
            if input_ids.dim() != 2 or input_ids.shape[0] != 1 or max_seqlen is None:
                raise ValueError(f"BertModel: with 'cu_seqlens', expected input_ids of shape "
                                 f"(1, T) and max_seqlen, got input_ids "
                                 f"{tuple(input_ids.shape)} and max_seqlen={max_seqlen!r}")
            t = input_ids.shape[1]
            return PackedBatch(cu_seqlens.to(torch.int32), int(max_seqlen), batch=1, seqlen=t)
        if not unpad or past_key_values is not None or not _can_pack_data_dependent():
            return None
        if attention_mask is not None:
            # a window counts positions, which packing closes up at padding between real
            # tokens: such a mask (or any while tracing) runs padded
            return pack_mask(attention_mask,
                             refuse_holes=0 <= self.local_window < input_ids.shape[-1] - 1)
        if position_ids is not None and input_ids.shape[0] == 1 and position_ids.numel() > 1:
            return pack_position_ids(position_ids, self.config.max_position_embeddings)
        return None  # no padding: the padded path computes on real tokens only already

    def _default_positions(self, input_ids, past: int = 0):
        """Position ids when none are given: past, past + 1, ... ((1, S), BERT), or, where
        positions start after the padding index (RoBERTa), pad_token_id + 1 + the count of
        non-padding tokens before each token ((B, S); padding at pad_token_id), both as
        transformers derives them."""
        offset = self.config.position_offset
        if not offset:
            return torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        real = input_ids.ne(self.config.pad_token_id)
        return (torch.cumsum(real, 1) + past) * real + self.config.pad_token_id

    def _embed(self, ids, types, positions, length: int, plan=None):
        """Embeddings, projected to hidden_size where they are narrower (ELECTRA). length: the
        sequence length, which bounds the positions without a host sync."""
        bound = length + self.config.position_offset
        x = self.embeddings(ids, types, positions, max_position=bound, plan=plan)
        return linear(x, self.embeddings_project) if self.embeddings_project is not None else x

    def _rotary(self, positions, dtype):
        """The pre-norm layers' rotary tables at these positions (fastbert/prenorm.py), else None."""
        if self.final_norm is None:
            return None
        return prenorm.rotary_tables(self.encoder.layer, positions, dtype)

    def _final_norm(self, x):
        return prenorm._norm(self.final_norm, x) if self.final_norm is not None else x

    def _run_layer(self, layer, x, attention_mask=None, cache=None, packed=None, plan=None,
                   rotary=None):
        """layer(x, ...), recomputed in backward under gradient checkpointing (not with a KV
        cache, which the recompute would extend twice). x goes positionally: a reentrant
        checkpoint only sees gradients of positional tensors. The plan goes to BertLayers only: a
        wrapped or subclassed layer is called as it always was; the rotary tables go to the
        pre-norm layers only."""
        kw = dict(packed=packed, plan=plan) if plan is not None and type(layer) is BertLayer \
            else dict(packed=packed)
        if rotary is not None:
            kw["rotary"] = rotary
        if (self.checkpointing_function is None or not self.training or cache is not None
                or not torch.is_grad_enabled()):
            if "plan" in kw and plan.direct:
                return lean.layer_forward(layer, x, plan)  # no hooks to run: no module call
            return layer(x, attention_mask, cache, **kw)
        return self.checkpointing_function(functools.partial(layer, **kw), x, attention_mask)

    def _forward_padded(self, input_ids, attention_mask, token_type_ids, position_ids,
                        past_key_values):
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        caches = past_key_values or [None] * len(self.encoder.layer)
        first = caches[0] or {}
        past = first["k"].shape[1] if "k" in first else 0  # positions already in the cache
        if position_ids is None:
            position_ids = self._default_positions(input_ids, past)
        plan = lean.plan(self, input_ids, None, attention_mask) if past_key_values is None \
            else None
        x = self._embed(input_ids, token_type_ids, position_ids, past + input_ids.shape[1], plan)
        rotary = self._rotary(position_ids.expand_as(input_ids), x.dtype)
        for layer, cache in zip(self.encoder.layer, caches):
            x = self._run_layer(layer, x, attention_mask, cache, plan=plan, rotary=rotary)
        x = self._final_norm(x)
        pooled = self.pooler(x[:, 0], plan) if self.pooler is not None else None  # (B, C)
        return x, pooled


from fastbert import prenorm  # noqa: E402  (it builds on this module's config and linear)
from fastbert import hf_lean_modernbert  # noqa: E402  (its checks use this module's too)
