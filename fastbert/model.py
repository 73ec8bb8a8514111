"""The BERT encoder on fastbert's fused ops: config, embeddings, encoder layer, pooler, BertModel.

Parameter names follow Hugging Face's BERT so checkpoints load as they are; the one difference is
the attention input projection, which is a single (3*hidden, hidden) GEMM here. State-dict hooks on
BertLayer split it into HF's query/key/value on save and merge them on load, so `state_dict()` and
`load_state_dict()` speak Hugging Face's key names.

Shapes: B batch, S sequence, C hidden size, nh heads, hd head dim (C = nh * hd).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn

import fastbert

# hidden_act -> linear_bias_gelu's `approximate`
_GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class BertConfig:
    """The fields of Hugging Face's BERT config.json. Unknown fields are kept in `extra` and
    written back unchanged."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    position_embedding_type: str = "absolute"
    is_decoder: bool = False
    classifier_dropout: Optional[float] = None
    num_labels: int = 2  # HF stores it as id2label, which to_dict() writes
    problem_type: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.position_embedding_type != "absolute":
            raise ValueError(f"BertConfig: position_embedding_type expected 'absolute' (the only one "
                             f"fastbert implements), got {self.position_embedding_type!r}")
        if self.hidden_act not in _GELU_APPROXIMATE:
            raise ValueError(f"BertConfig: hidden_act expected one of {sorted(_GELU_APPROXIMATE)}, "
                             f"got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"BertConfig: hidden_size expected a multiple of num_attention_heads "
                             f"({self.num_attention_heads}), got {self.hidden_size}")
        if self.head_dim > fastbert.ops.MAX_HEAD_DIM:
            raise ValueError(f"BertConfig: head dim hidden_size / num_attention_heads expected <= "
                             f"{fastbert.ops.MAX_HEAD_DIM}, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        return _GELU_APPROXIMATE[self.hidden_act]

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "BertConfig":
        d = {**d, **overrides}
        known = {f.name for f in fields(cls)} - {"extra"}
        if "num_labels" not in d and isinstance(d.get("id2label"), dict):
            d["num_labels"] = len(d["id2label"])
        return cls(**{k: v for k, v in d.items() if k in known},
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        d = {**self.extra, "model_type": "bert"}
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        n = d.pop("num_labels")
        if len(d.get("id2label") or {}) != n:  # HF derives num_labels from id2label
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(n)}
        return d

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "BertConfig":
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(file) as f:
            return cls.from_dict(json.load(f), **overrides)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)


class ModelOutput:
    """Base of the output dataclasses: fields by name, or HF-style out[0] over the fields set."""

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def __getitem__(self, i):
        return getattr(self, i) if isinstance(i, str) else self.to_tuple()[i]


@dataclass
class BertModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor = None  # (B, S, C)
    pooler_output: Optional[torch.Tensor] = None  # (B, C)


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
        nn.init.zeros_(module.bias)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        c = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, c, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, c)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, c)
        self.LayerNorm = nn.LayerNorm(c, eps=config.layer_norm_eps)  # parameters only
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Old HF checkpoints carry these buffers; they are derived from the config, not loaded.
        self._register_load_state_dict_pre_hook(_drop_buffers_from_checkpoint)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0)  # (1, S)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))  # (B, S, C)
        x = fastbert.add_layer_norm(x, None, self.LayerNorm.weight, self.LayerNorm.bias,
                                    self.LayerNorm.eps)
        return self.dropout(x)


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

    def forward(self, x, attention_mask=None, kv_cache: Optional[dict] = None):
        """kv_cache: a dict this layer keeps its keys/values in ("k", "v": (B, S_past, nh, hd)).
        Given one, x holds only the new positions; they attend to the cached ones as well, and the
        cache is extended. attention_mask then covers all S_past + S keys."""
        b, s, c = x.shape  # (B, S, C)
        training = self.training
        qkv = self.qkv(x).view(b, s, 3, self.n_head, self.head_dim)  # (B, S, 3, nh, hd)
        q, k, v = qkv.unbind(2)  # three (B, S, nh, hd) views of one GEMM output, no copies
        if kv_cache is not None:
            # causal attention is bottom-right aligned, so the new queries (Sq < Sk) see the cache
            if "k" in kv_cache:
                k, v = torch.cat([kv_cache["k"], k], 1), torch.cat([kv_cache["v"], v], 1)
            kv_cache["k"], kv_cache["v"] = k, v
        y = fastbert.attention(q, k, v, attention_mask, causal=self.causal,
                               dropout_p=self.attn_dropout if training else 0.0)
        y = y.view(b, s, c)  # (B, S, C)
        h = fastbert.add_layer_norm(self.attn_out(y), x, self.attn_norm.weight, self.attn_norm.bias,
                                    self.attn_norm.eps,
                                    dropout_p=self.hidden_dropout if training else 0.0)
        f = fastbert.linear_bias_gelu(h, self.ffn_in.weight, self.ffn_in.bias,
                                      approximate=self.gelu_approximate)  # (B, S, intermediate_size)
        return fastbert.add_layer_norm(self.ffn_out(f), h, self.ffn_norm.weight, self.ffn_norm.bias,
                                       self.ffn_norm.eps,
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

    def forward(self, x):  # (B, S, C) -> (B, C), from the [CLS] token
        return torch.tanh(self.dense(x[:, 0]))


class BertPreTrainedModel(nn.Module):
    """Common base: the config and Hugging Face checkpoint I/O (see fastbert/hf.py)."""

    base_model_prefix = "bert"

    def __init__(self, config: BertConfig):
        super().__init__()
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


class BertModel(BertPreTrainedModel):
    """The encoder: embeddings, num_hidden_layers BertLayers, and (optionally) the pooler.
    As in transformers, config.is_decoder makes the self-attention causal."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(
            [BertLayer(config, causal=config.is_decoder)
             for _ in range(config.num_hidden_layers)])))
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                past_key_values: Optional[list] = None):
        """input_ids (B, S); attention_mask (B, S) with 1/True for real tokens (HF convention).
        past_key_values: one dict per layer (start with empty ones), filled and extended by each
        call, so a later call passes only the new tokens (see BertLayer; decoders only)."""
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        caches = past_key_values or [None] * len(self.encoder.layer)
        first = caches[0] or {}
        past = first["k"].shape[1] if "k" in first else 0  # positions already in the cache
        if position_ids is None and past:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, S, C)
        for layer, cache in zip(self.encoder.layer, caches):
            x = layer(x, attention_mask, cache)
        pooled = self.pooler(x) if self.pooler is not None else None  # (B, C)
        return BertModelOutput(last_hidden_state=x, pooler_output=pooled)
