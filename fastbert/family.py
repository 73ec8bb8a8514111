"""The BERT family in fastbert's own classes: what RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT and
ModernBERT checkpoints differ in, as data.

They share BERT's encoder (post-LN layers, GELU feed-forward, learned positions); the rest is a
handful of facts per architecture, read by BertConfig (fastbert/model.py) and by checkpoint I/O
(fastbert/hf.py), never tested for by name inside the model:

- where positions start: RoBERTa and XLM-R count real tokens from pad_token_id + 1;
- segments: DistilBERT has no token-type table (type_vocab_size 0);
- ELECTRA's embeddings are narrower than the encoder (embedding_size, then embeddings_project);
- the pooler, the classification head and the MLM head's activation;
- checkpoint key names and, for DistilBERT, config.json field names.

ModernBERT (issue 20) is the one member with another encoder: pre-norm layers (fastbert/prenorm.py)
with rotary positions instead of a position table, a final norm, and config.json fields beyond
BERT's (`settings`) that BertConfig.setting reads with transformers' defaults.

    family = FAMILIES["roberta"]
    family.to_checkpoint({"bert.encoder.layer.0.attention.self.query.weight": w}, bare=False)
    # -> {"roberta.encoder.layer.0.attention.self.query.weight": w}; from_checkpoint the reverse
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

# fastbert class -> the transformers class suffix it is saved as (after the family's prefix)
_HEAD_SUFFIX = {
    "BertModel": "Model",
    "BertForSequenceClassification": "ForSequenceClassification",
    "BertForTokenClassification": "ForTokenClassification",
    "BertForQuestionAnswering": "ForQuestionAnswering",
    "BertForMaskedLM": "ForMaskedLM",
    "BertForMultipleChoice": "ForMultipleChoice",
    "BertLMHeadModel": "ForCausalLM",
}


def _heads(prefix: str, names) -> Dict[str, str]:
    return {name: prefix + _HEAD_SUFFIX[name] for name in names}


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    checkpoint_prefix: str  # the base model's attribute in the head checkpoints: "roberta.", ...
    heads: Dict[str, str]  # fastbert class -> its transformers counterpart in this family
    # positions of real tokens start at pad_token_id + 1 and count real tokens only (RoBERTa)
    positions_after_padding: bool = False
    has_pooler: bool = True  # the base model's checkpoint carries pooler.dense
    projects_embeddings: bool = False  # embedding_size may differ from hidden_size (ELECTRA)
    # sequence classification: "pooler" (BERT: pooler -> dropout -> classifier), "dense" (dropout
    # -> dense -> activation -> dropout -> out_proj on the first token), "pre_classifier"
    # (DistilBERT: the same without the first dropout) or "prediction_head" (ModernBERT: the
    # first token or the mean of the sequence -> dense -> activation -> norm -> dropout -> out_proj)
    classifier: str = "pooler"
    classifier_activation: str = "tanh"
    mlm_activation: Optional[str] = None  # the MLM transform's activation; None: hidden_act
    qa_dropout: bool = False  # dropout on the hidden states before qa_outputs (DistilBERT)
    # checkpoint key renames, (fastbert's key, the checkpoint's) as templates where "{n}" stands
    # for a layer index, both with the encoder under "bert." (the base-model prefix is swapped
    # separately); each key takes the first rename that matches it
    key_renames: Tuple[Tuple[str, str], ...] = ()
    # checkpoint keys that are aliases of one of fastbert's (older files carry them): read only
    key_aliases: Tuple[Tuple[str, str], ...] = ()
    # config.json field renames: fastbert's BertConfig field -> the family's name (DistilBERT)
    config_names: Dict[str, str] = field(default_factory=dict)
    # BertConfig fields the family's config.json does not have (fixed by the architecture)
    fixed_config: Dict[str, object] = field(default_factory=dict)
    # BertConfig fields left None that the family's transformers config gives a value
    config_defaults: Dict[str, object] = field(default_factory=dict)
    # pre-norm layers with rotary positions and a final norm (ModernBERT; fastbert/prenorm.py)
    pre_norm: bool = False
    # config.json fields beyond BertConfig's that the model reads (BertConfig.setting), with the
    # family's transformers defaults
    settings: Dict[str, object] = field(default_factory=dict)
    # BertConfig fields whose default in the family's transformers config differs from BERT's:
    # a BertConfig built with this model_type and without them takes these
    field_defaults: Dict[str, object] = field(default_factory=dict)

    def architecture(self, fastbert_class: str) -> str:
        """transformers' class for a fastbert class (BertForMaskedLM -> RobertaForMaskedLM)."""
        if fastbert_class not in self.heads:
            raise ValueError(f"{fastbert_class}: fastbert serves no {self.model_type} version of "
                             f"it; model_type {self.model_type!r} serves "
                             f"{', '.join(self.heads)}")
        return self.heads[fastbert_class]

    def fastbert_class(self, architecture: str) -> Optional[str]:
        """The fastbert class for one of transformers' class names of this family, or None."""
        return next((ours for ours, theirs in self.heads.items() if theirs == architecture), None)

    def to_checkpoint(self, state: dict, bare: bool) -> dict:
        """fastbert's state dict -> the family's checkpoint keys. bare: a BertModel's (keys
        "embeddings.…"), saved bare as transformers saves its base models; else a head's (the
        encoder under "bert.")."""
        renames = _compiled(self.key_renames)
        out = {}
        for key, value in state.items():
            key = _rename("bert." + key if bare else key, renames)
            if key.startswith("bert."):
                key = ("" if bare else self.checkpoint_prefix) + key[len("bert."):]
            out[key] = value
        return out

    def from_checkpoint(self, state: dict, bare_model: bool, model_keys=None) -> dict:
        """The family's checkpoint (bare or with its heads) -> fastbert's keys for a BertModel
        (bare_model) or a head class (the encoder under "bert."). model_keys: the state-dict
        keys of the model loading it; a checkpoint key several of fastbert's map to (ModernBERT's
        head.dense: the MLM head's and the classifier's) then takes the one the model has."""
        renames = _compiled(tuple((theirs, ours) for ours, theirs
                                  in self.key_renames + self.key_aliases))
        prefixed = any(k.startswith(self.checkpoint_prefix) for k in state)
        known = None if model_keys is None else {("bert." + k if bare_model else k)
                                                 for k in model_keys}
        out = {}
        for key, value in state.items():
            if key.startswith(self.checkpoint_prefix):
                key = "bert." + key[len(self.checkpoint_prefix):]
            elif not prefixed:  # a bare checkpoint: everything is the base model
                key = "bert." + key
            key = _rename(key, renames, known)
            if bare_model and key.startswith("bert."):
                key = key[len("bert."):]
            out[key] = value
        return out


@functools.lru_cache(maxsize=None)
def _compiled(renames: Tuple[Tuple[str, str], ...]):
    """(whole-key regex, replacement) per (from, to) template pair."""
    layer = re.escape("{n}")
    return [(re.compile("^" + re.escape(src).replace(layer, r"(?P<n>\d+)") + "$"),
             dst.replace("{n}", r"\g<n>")) for src, dst in renames]


def _rename(key: str, renames, known=None) -> str:
    """The first rename that matches key; given the model's `known` keys, the first whose result
    the model has, else the key itself where the model has that."""
    first = None
    for pattern, replacement in renames:
        new, n = pattern.subn(replacement, key, count=1)
        if n:
            if known is None or new in known:
                return new
            first = first or new
    if known is not None and key in known:
        return key
    return first or key


def _distilbert_layer(ours: str, theirs: str) -> Tuple[str, str]:
    return f"bert.encoder.layer.{{n}}.{ours}", f"bert.transformer.layer.{{n}}.{theirs}"


def _lm_head(dense: str, norm: str, decoder: str, bias: str) -> Tuple[Tuple[str, str], ...]:
    """The MLM head's keys: transform dense and LayerNorm, the tied decoder, and its bias (saved
    under the family's one name; fastbert's decoder.bias is the same parameter)."""
    return (("cls.predictions.transform.dense.weight", f"{dense}.weight"),
            ("cls.predictions.transform.dense.bias", f"{dense}.bias"),
            ("cls.predictions.transform.LayerNorm.weight", f"{norm}.weight"),
            ("cls.predictions.transform.LayerNorm.bias", f"{norm}.bias"),
            ("cls.predictions.decoder.weight", f"{decoder}.weight"),
            ("cls.predictions.bias", bias),
            ("cls.predictions.decoder.bias", bias))


def _lm_head_alias(decoder: str) -> Tuple[Tuple[str, str], ...]:
    return (("cls.predictions.decoder.bias", f"{decoder}.bias"),)


_ENCODER_HEADS = ("BertModel", "BertForSequenceClassification", "BertForTokenClassification",
                  "BertForQuestionAnswering", "BertForMaskedLM")
_ROBERTA_LM = _lm_head("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias")
_ROBERTA_LM_ALIAS = _lm_head_alias("lm_head.decoder")


def _modernbert_renames() -> Tuple[Tuple[str, str], ...]:
    """ModernBERT's names: embeddings, layers (fastbert/prenorm.py's names are BertLayer's),
    the MLM head (head, decoder) and the classifier (head, classifier; span QA's as well)."""
    layer = (("qkv", "attn.Wqkv"), ("attn_out", "attn.Wo"), ("attn_norm", "attn_norm"),
             ("ffn_in", "mlp.Wi"), ("ffn_out", "mlp.Wo"), ("ffn_norm", "mlp_norm"))
    return (("bert.embeddings.word_embeddings.weight", "bert.embeddings.tok_embeddings.weight"),
            *((f"bert.embeddings.LayerNorm.{kind}", f"bert.embeddings.norm.{kind}")
              for kind in ("weight", "bias")),
            *((f"bert.encoder.layer.{{n}}.{ours}.{kind}", f"bert.layers.{{n}}.{theirs}.{kind}")
              for ours, theirs in layer for kind in ("weight", "bias")),
            *_lm_head("head.dense", "head.norm", "decoder", "decoder.bias"),
            *((f"{head}.{ours}.{kind}", f"{theirs}.{kind}")
              for head in ("classifier", "qa_outputs")  # QA's head is the classifier's
              for ours, theirs in (("dense", "head.dense"), ("norm", "head.norm"),
                                   ("out_proj", "classifier"))
              for kind in ("weight", "bias")))


FAMILIES: Dict[str, Family] = {f.model_type: f for f in (
    Family("bert", "bert.", heads={name: name for name in (
        *_ENCODER_HEADS, "BertLMHeadModel", "BertForPreTraining",
        "BertForNextSentencePrediction", "BertForMultipleChoice")}),
    Family("roberta", "roberta.", heads=_heads("Roberta", _ENCODER_HEADS + ("BertLMHeadModel",)),
           positions_after_padding=True, classifier="dense", mlm_activation="gelu",
           key_renames=_ROBERTA_LM, key_aliases=_ROBERTA_LM_ALIAS),
    Family("xlm-roberta", "roberta.",
           heads=_heads("XLMRoberta", _ENCODER_HEADS + ("BertLMHeadModel",)),
           positions_after_padding=True, classifier="dense", mlm_activation="gelu",
           key_renames=_ROBERTA_LM, key_aliases=_ROBERTA_LM_ALIAS),
    Family("electra", "electra.", heads=_heads("Electra", _ENCODER_HEADS + ("BertLMHeadModel",)),
           has_pooler=False, projects_embeddings=True, classifier="dense",
           classifier_activation="gelu", mlm_activation="gelu",
           key_renames=_lm_head("generator_predictions.dense", "generator_predictions.LayerNorm",
                                "generator_lm_head", "generator_lm_head.bias"),
           key_aliases=_lm_head_alias("generator_lm_head")),
    Family("distilbert", "distilbert.", heads=_heads("DistilBert", _ENCODER_HEADS),
           has_pooler=False, classifier="pre_classifier", classifier_activation="relu",
           qa_dropout=True,
           key_renames=(
               *(_distilbert_layer(f"{ours}.{kind}", f"{theirs}.{kind}")
                 for ours, theirs in (("attention.self.query", "attention.q_lin"),
                                      ("attention.self.key", "attention.k_lin"),
                                      ("attention.self.value", "attention.v_lin"),
                                      ("attention.output.dense", "attention.out_lin"),
                                      ("attention.output.LayerNorm", "sa_layer_norm"),
                                      ("intermediate.dense", "ffn.lin1"),
                                      ("output.dense", "ffn.lin2"),
                                      ("output.LayerNorm", "output_layer_norm"))
                 for kind in ("weight", "bias")),
               *((f"classifier.{ours}.{kind}", f"{theirs}.{kind}")
                 for ours, theirs in (("dense", "pre_classifier"), ("out_proj", "classifier"))
                 for kind in ("weight", "bias")),
               *_lm_head("vocab_transform", "vocab_layer_norm", "vocab_projector",
                         "vocab_projector.bias")),
           key_aliases=_lm_head_alias("vocab_projector"),
           config_names=dict(hidden_size="dim", num_hidden_layers="n_layers",
                             num_attention_heads="n_heads", intermediate_size="hidden_dim",
                             hidden_act="activation", hidden_dropout_prob="dropout",
                             attention_probs_dropout_prob="attention_dropout",
                             classifier_dropout="seq_classif_dropout"),
           fixed_config=dict(type_vocab_size=0, layer_norm_eps=1e-12),
           config_defaults=dict(classifier_dropout=0.2)),
    Family("modernbert", "model.", heads=_heads("ModernBert", (
        *_ENCODER_HEADS, "BertForMultipleChoice")),
           has_pooler=False, classifier="prediction_head", pre_norm=True,
           key_renames=_modernbert_renames(),
           config_names=dict(hidden_act="hidden_activation", layer_norm_eps="norm_eps",
                             attention_probs_dropout_prob="attention_dropout",
                             hidden_dropout_prob="mlp_dropout"),
           fixed_config=dict(type_vocab_size=0, position_embedding_type="rotary"),
           config_defaults=dict(classifier_dropout=0.0),
           settings=dict(norm_bias=False, attention_bias=False, mlp_bias=False,
                         classifier_bias=False, decoder_bias=True, classifier_activation="gelu",
                         classifier_pooling="cls", embedding_dropout=0.0, local_attention=128,
                         global_attn_every_n_layers=3, layer_types=None, rope_parameters=None,
                         global_rope_theta=160000.0, local_rope_theta=10000.0,
                         initializer_cutoff_factor=2.0, sparse_prediction=False,
                         sparse_pred_ignore_index=-100, deterministic_flash_attn=False),
           field_defaults=dict(vocab_size=50368, num_hidden_layers=22, intermediate_size=1152,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               max_position_embeddings=8192, layer_norm_eps=1e-5,
                               pad_token_id=50283)),
)}


def family_of(model_type: str) -> Family:
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"BertConfig: model_type expected one of {sorted(FAMILIES)}, "
                         f"got {model_type!r}")
    return family



def fastbert_base_class(cls: type) -> Optional[str]:
    """The fastbert model class (by name) a class is or derives from, or None."""
    return next((c.__name__ for c in cls.__mro__ if c.__name__ in FAMILIES["bert"].heads), None)
