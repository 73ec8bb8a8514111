"""BertConfig: the fields of Hugging Face's BERT config.json, read and written in each family
member's own names, with what the family fixes (fastbert/family.py). fastbert.model re-exports it.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field, fields
from typing import Optional

import fastbert
from fastbert.family import Family, family_of

# hidden_act -> linear_bias_gelu's `approximate`
_GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
_POSITION_TYPES = ("absolute", "sinusoidal", "rotary")
# run-time choices, not properties of the checkpoint: never written to config.json
_RUNTIME_FIELDS = ("unpad",)


@dataclass
class BertConfig:
    """The fields of Hugging Face's BERT config.json. Unknown fields are kept in `extra` and
    written back unchanged.

    model_type selects the family member (bert, roberta, xlm-roberta, electra, distilbert,
    modernbert; see fastbert/family.py): its config.json is read and written in its own field names, and
    `family` says what the architecture fixes (position offset, pooler, head shapes)."""
    model_type: str = "bert"
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
    embedding_size: Optional[int] = None  # ELECTRA: narrower embeddings, projected to hidden_size
    # Run every layer on the real tokens only (packed), not on padding. False: the padded path.
    unpad: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        family = family_of(self.model_type)
        for name, value in family.fixed_config.items():
            setattr(self, name, value)  # fixed by the architecture (DistilBERT: no segments)
        for name, value in family.config_defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if family.positions_after_padding and not isinstance(self.pad_token_id, int):
            raise ValueError(f"BertConfig: model_type {self.model_type!r} counts positions from "
                             f"pad_token_id + 1: pad_token_id expected an int, got "
                             f"{self.pad_token_id!r}")
        if isinstance(self.pad_token_id, int) and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"BertConfig: pad_token_id expected < vocab_size "
                             f"({self.vocab_size}) for model_type {self.model_type!r}, got "
                             f"{self.pad_token_id}")
        if self.embedding_dim != self.hidden_size and not family.projects_embeddings:
            raise ValueError(f"BertConfig: embedding_size expected None or hidden_size "
                             f"({self.hidden_size}) for model_type {self.model_type!r} (only "
                             f"ELECTRA projects its embeddings), got {self.embedding_size}")
        if self.position_embedding_type not in _POSITION_TYPES:
            raise ValueError(f"BertConfig: position_embedding_type expected one of "
                             f"{_POSITION_TYPES}, got {self.position_embedding_type!r}")
        if (self.position_embedding_type == "rotary") != family.pre_norm:
            raise ValueError(f"BertConfig: position_embedding_type 'rotary' is ModernBERT's "
                             f"(model_type 'modernbert') and only its, got "
                             f"{self.position_embedding_type!r} for {self.model_type!r}")
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
    def family(self) -> Family:
        return family_of(self.model_type)

    @property
    def position_offset(self) -> int:
        """The position id of each sequence's first token: pad_token_id + 1 for RoBERTa and
        XLM-R (whose padding tokens take position pad_token_id), else 0."""
        return self.pad_token_id + 1 if self.family.positions_after_padding else 0

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence the position table serves (RoBERTa's first positions are taken)."""
        return self.max_position_embeddings - self.position_offset

    @property
    def embedding_dim(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def mlm_gelu_approximate(self) -> str:
        """The MLM transform's GELU: the family's own (RoBERTa, ELECTRA: exact), else the encoder's."""
        activation = self.setting("classifier_activation",  # ModernBERT's
                                  self.family.mlm_activation or self.hidden_act)
        if activation not in _GELU_APPROXIMATE:
            raise ValueError(f"BertConfig: classifier_activation expected one of "
                             f"{sorted(_GELU_APPROXIMATE)}, got {activation!r}")
        return _GELU_APPROXIMATE[activation]

    @property
    def qa_dropout(self) -> float:
        """Dropout on the hidden states before the QA head (DistilBERT's qa_dropout), else 0."""
        return float(self.extra.get("qa_dropout", 0.1)) if self.family.qa_dropout else 0.0

    @property
    def gelu_approximate(self) -> str:
        return _GELU_APPROXIMATE[self.hidden_act]

    def setting(self, name: str, default):
        """A config.json field beyond BertConfig's that the family has (ModernBERT's norm_bias,
        local_attention, ...: family.settings), else the family's default for it; `default` for
        a family without the field."""
        settings = self.family.settings
        return self.extra.get(name, settings[name]) if name in settings else default

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "BertConfig":
        d = {**d, **overrides}  # overrides in either naming
        family = family_of(d.get("model_type", "bert"))
        d = {ours: d[theirs] for ours, theirs in family.config_names.items() if theirs in d} | {
            k: v for k, v in d.items() if k not in family.config_names.values()}
        known = {f.name for f in fields(cls)} - {"extra"}
        if "num_labels" not in d and isinstance(d.get("id2label"), dict):
            d["num_labels"] = len(d["id2label"])
        return cls(**{k: v for k, v in d.items() if k in known},
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        family = self.family
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in fields(self)
                  if f.name not in ("extra", *_RUNTIME_FIELDS, *family.fixed_config)})
        if family.projects_embeddings:  # ELECTRA's config defaults it to 128: always write it
            d["embedding_size"] = self.embedding_dim
        else:
            del d["embedding_size"]
        for ours, theirs in family.config_names.items():
            value = d.pop(ours)
            if value is not None:  # None: the family's own default
                d[theirs] = value
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


_dataclass_init = BertConfig.__init__


@functools.wraps(_dataclass_init)
def _init_with_family_defaults(self, *args, **kwargs):
    """The dataclass's __init__; fields not given take the family's transformers defaults where
    they differ from BERT's (family.field_defaults: a BertConfig(model_type="modernbert") has
    ModernBERT-base's shape, eps, dropout and padding id)."""
    model_type = args[0] if args else kwargs.get("model_type", "bert")
    given = {f.name for f in fields(BertConfig)[:len(args)]} | kwargs.keys()
    defaults = family_of(model_type).field_defaults
    _dataclass_init(self, *args, **kwargs, **{k: v for k, v in defaults.items() if k not in given})


BertConfig.__init__ = _init_with_family_defaults
