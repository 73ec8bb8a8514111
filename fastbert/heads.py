"""BERT's pre-training and fine-tuning heads, with Hugging Face's class names, output fields, loss
conventions (label -100 is ignored) and parameter names.

The heads work on the rows the encoder computed (real tokens only when it runs unpadded) and put
per-token outputs back on the caller's (B, S) grid, zeros at padding. The MLM and LM heads, given
labels and `return_logits=False`, run the vocabulary decoder only where a label is set (15 % of
tokens in pre-training): the loss is the same, the largest GEMM of the step shrinks ~7x.

The other members of the family (RoBERTa, XLM-R, ELECTRA, DistilBERT, ModernBERT) use the same
classes; their config's `family` (fastbert/family.py) picks the classification head's shape and the
MLM head's activation, width and biases, and checkpoint I/O maps the parameter names.

Shapes: B batch, S sequence, C hidden size, E embedding size (C but for ELECTRA), V vocabulary.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastbert
from fastbert import prenorm
from fastbert.model import (BertConfig, BertModel, BertPreTrainedModel, ModelOutput, init_weights,
                            linear, linear_gelu)
from fastbert.padding import first_tokens, mean_tokens

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# outputs (the fields of the transformers classes of the same name)
# --------------------------------------------------------------------------------------------

@dataclass
class BertForPreTrainingOutput(ModelOutput):
    loss: Optional[Tensor] = None
    prediction_logits: Tensor = None  # (B, S, V); None with return_logits=False
    seq_relationship_logits: Tensor = None  # (B, 2)
    # with return_logits=False: (M, V) logits at the M labelled positions, in row-major order
    # (labels[labels != -100] are their targets)
    labelled_logits: Optional[Tensor] = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Optional[Tensor] = None
    logits: Tensor = None  # (B, S, V); None with return_logits=False
    labelled_logits: Optional[Tensor] = None  # (M, V), see BertForPreTrainingOutput


@dataclass
class CausalLMOutput(ModelOutput):
    loss: Optional[Tensor] = None
    logits: Tensor = None  # (B, S, V); None with return_logits=False
    labelled_logits: Optional[Tensor] = None  # (M, V) where the shifted labels are set


@dataclass
class NextSentencePredictorOutput(ModelOutput):
    loss: Optional[Tensor] = None
    logits: Tensor = None  # (B, 2)


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: Optional[Tensor] = None
    logits: Tensor = None  # (B, num_labels)


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: Optional[Tensor] = None
    logits: Tensor = None  # (B, S, num_labels)


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Optional[Tensor] = None
    start_logits: Tensor = None  # (B, S)
    end_logits: Tensor = None  # (B, S)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------

class BertLMPredictionHead(nn.Module):
    """MLM head: dense (C -> E) + GELU + LayerNorm, then a decoder whose weight is the word
    embeddings. The GELU is the encoder's, or the family's own (RoBERTa: exact GELU always).
    ModernBERT's dense and LayerNorm are bias-free unless its config says otherwise."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        c, e = config.hidden_size, config.embedding_dim
        self.gelu_approximate = config.mlm_gelu_approximate
        self.transform = nn.ModuleDict(dict(
            dense=nn.Linear(c, e, bias=config.setting("classifier_bias", True)),
            LayerNorm=nn.LayerNorm(e, eps=config.layer_norm_eps,
                                   bias=config.setting("norm_bias", True))))
        self.decoder = nn.Linear(e, config.vocab_size, bias=config.setting("decoder_bias", True))
        self.apply(lambda m: init_weights(m, config.initializer_range))
        if config.family.pre_norm:  # ModernBERT's scheme
            prenorm.init_weights(self.transform["dense"], config, "out")
        self.decoder.weight = word_embeddings.weight  # tied
        self.bias = self.decoder.bias  # HF names the decoder bias cls.predictions.bias too

    def forward(self, x):  # (N, C) -> (N, V)
        dense, norm = self.transform["dense"], self.transform["LayerNorm"]
        x = linear_gelu(x, dense, self.gelu_approximate)
        x = fastbert.add_layer_norm(x, None, norm.weight, norm.bias, norm.eps)
        return linear(x, self.decoder)


class ClassificationHead(nn.Module):
    """The first token -> dropout -> dense -> activation -> dropout -> out_proj: RoBERTa's, XLM-R's
    and ELECTRA's sequence classifier (tanh, tanh, GELU); DistilBERT's without the first dropout
    (ReLU; its checkpoints name dense/out_proj pre_classifier/classifier)."""

    _ACTIVATIONS = {"tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu}
    pooling = "cls"  # on each sequence's first token

    def __init__(self, config: BertConfig):
        super().__init__()
        c, family = config.hidden_size, config.family
        p = config.classifier_dropout
        self.dropout = nn.Dropout(p if p is not None else config.hidden_dropout_prob)
        self.input_dropout = family.classifier == "dense"
        self.activation = self._ACTIVATIONS[family.classifier_activation]
        self.dense = _linear(config, c, c)
        self.out_proj = _linear(config, c, config.num_labels)

    def forward(self, first):  # (B, C) -> (B, num_labels)
        x = self.dropout(first) if self.input_dropout else first
        x = self.dropout(self.activation(self.dense(x)))
        return self.out_proj(x)


class PredictionHeadClassifier(nn.Module):
    """ModernBERT's sequence classifier: each sequence's first token, or the mean of its real
    tokens (classifier_pooling "mean") -> dense -> GELU -> LayerNorm -> dropout -> out_proj
    (its checkpoints name dense/norm head.dense/head.norm and out_proj classifier); per token,
    its token-classification and span-QA head. num_labels: out_proj's width (default the
    config's)."""

    def __init__(self, config: BertConfig, num_labels: Optional[int] = None):
        super().__init__()
        c = config.hidden_size
        self.pooling = config.setting("classifier_pooling", "cls")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"BertForSequenceClassification: classifier_pooling expected 'cls' "
                             f"or 'mean', got {self.pooling!r}")
        self.gelu_approximate = config.mlm_gelu_approximate
        self.dense = nn.Linear(c, c, bias=config.setting("classifier_bias", True))
        self.norm = nn.LayerNorm(c, eps=config.layer_norm_eps,
                                 bias=config.setting("norm_bias", True))
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.out_proj = nn.Linear(c, config.num_labels if num_labels is None else num_labels)
        self.apply(lambda m: init_weights(m, config.initializer_range))
        prenorm.init_weights(self.dense, config, "out")  # ModernBERT's scheme
        prenorm.init_weights(self.out_proj, config, "final_out")

    def forward(self, pooled):  # (B, C) -> (B, num_labels)
        x = linear_gelu(pooled, self.dense, self.gelu_approximate)
        x = fastbert.add_layer_norm(x, None, self.norm.weight, self.norm.bias, self.norm.eps)
        return self.out_proj(self.dropout(x))


def _mean_rows(out, attention_mask: Optional[Tensor]) -> Tensor:
    """(B, C): the mean of each sequence's real tokens, from the encoder's rows (packed, or the
    full grid with the caller's mask, all of it without one, as transformers does)."""
    packed, rows = out.packed, out.last_hidden_state
    if packed.cu_seqlens is not None:
        return mean_tokens(rows, packed.cu_seqlens)
    grid = rows.view(packed.batch, packed.seqlen, -1)
    if attention_mask is None:
        return grid.mean(1)
    weights = attention_mask.to(grid.dtype).unsqueeze(-1)
    return (grid * weights).sum(1) / weights.sum(1)


def _first_token_rows(out, attention_mask: Optional[Tensor] = None) -> Tensor:
    """(B, C): each sequence's first token, from the encoder's rows (packed or the full grid). On the
    grid, position 0, or with a mask each row's first real token (transformers' multiple choice)."""
    packed = out.packed
    if packed.cu_seqlens is not None:
        return first_tokens(out.last_hidden_state, packed.cu_seqlens)
    grid = out.last_hidden_state.view(packed.batch, packed.seqlen, -1)
    if attention_mask is None:
        return grid[:, 0]
    first = attention_mask.ne(0).int().argmax(-1).to(grid.device)  # (B,): the first maximum
    return grid[torch.arange(grid.shape[0], device=grid.device), first]


def _linear(config: BertConfig, n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    init_weights(layer, config.initializer_range)
    return layer


def span_loss(start_logits: Tensor, end_logits: Tensor, start_positions: Tensor,
              end_positions: Tensor, real: Optional[Tensor] = None) -> Tensor:
    """Extractive-QA loss: the mean of the start and end cross-entropies over the sequence
    (B, S). Positions outside it are clamped to S and ignored, as in transformers. real (B, S),
    True at real tokens: padding is masked out of the softmax (it can never be a span boundary)
    and a label at padding is ignored too; None normalises over every position, as transformers
    does on a padded batch."""
    s = start_logits.shape[1]
    losses = []
    for logits, positions in ((start_logits, start_positions), (end_logits, end_positions)):
        positions = positions.reshape(-1).clamp(0, s)
        if real is not None:
            logits = logits.float().masked_fill(~real, torch.finfo(torch.float32).min)
            at_padding = ~F.pad(real, (0, 1), value=True).gather(1, positions[:, None])[:, 0]
            positions = positions.masked_fill(at_padding, s)
        losses.append(_cross_entropy(logits, positions, ignore_index=s))
    return (losses[0] + losses[1]) / 2


def _cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=ignore_index)


def _token_logits(head: nn.Module, out, labels: Optional[Tensor], return_logits: bool,
                  unlabelled: int = -100):
    """(logits on the (B, S) grid or None, loss or None, labelled-row logits or None) of a
    per-token vocabulary head over the encoder's rows `out.last_hidden_state` (N, C). Without
    logits wanted (and labels given), the head runs on the rows whose label is not
    `unlabelled` only (the loss ignores -100 either way)."""
    rows, packed = out.last_hidden_state, out.packed
    row_labels = packed.rows(labels) if labels is not None else None  # (N,)
    if row_labels is not None and not return_logits:
        chosen = torch.nonzero(row_labels != unlabelled).flatten()  # one host sync: the count
        labelled = head(rows.index_select(0, chosen))  # (M, V)
        return None, _cross_entropy(labelled, row_labels.index_select(0, chosen)), labelled
    logits = head(rows)  # (N, V)
    loss = _cross_entropy(logits, row_labels) if row_labels is not None else None
    return packed.grid(logits), loss, None


# --------------------------------------------------------------------------------------------
# the heads
# --------------------------------------------------------------------------------------------

class BertForPreTraining(BertPreTrainedModel):
    """MLM + NSP. loss = MLM loss + NSP loss when both `labels` and `next_sentence_label` are given."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = nn.ModuleDict(dict(
            predictions=BertLMPredictionHead(config, self.bert.embeddings.word_embeddings),
            seq_relationship=_linear(config, config.hidden_size, 2)))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, next_sentence_label=None, return_logits: bool = True, **packing):
        """return_logits=False: no prediction_logits, the MLM head runs at labelled positions
        only (the loss is unchanged). packing: cu_seqlens/max_seqlen/unpad, see BertModel."""
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        return_packed=True, **packing)
        seq_relationship_logits = self.cls["seq_relationship"](out.pooler_output)  # (B, 2)
        prediction_logits, mlm_loss, labelled = _token_logits(self.cls["predictions"], out, labels,
                                                              return_logits)  # (B, S, V)
        loss = None
        if mlm_loss is not None and next_sentence_label is not None:
            loss = mlm_loss + _cross_entropy(seq_relationship_logits, next_sentence_label)
        return BertForPreTrainingOutput(loss, prediction_logits, seq_relationship_logits, labelled)


class BertForMaskedLM(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = nn.ModuleDict(dict(
            predictions=BertLMPredictionHead(config, self.bert.embeddings.word_embeddings)))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, return_logits: bool = True, **packing):
        """ModernBERT's config.sparse_prediction, with labels: logits (M, V) at the rows whose
        label is not sparse_pred_ignore_index only, as transformers returns them."""
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        return_packed=True, **packing)
        sparse = labels is not None and self.config.setting("sparse_prediction", False)
        logits, loss, labelled = _token_logits(
            self.cls["predictions"], out, labels, return_logits and not sparse,
            self.config.setting("sparse_pred_ignore_index", -100))
        if sparse:
            return MaskedLMOutput(loss, labelled, labelled)
        return MaskedLMOutput(loss, logits, labelled)  # logits (B, S, V)


class BertForNextSentencePrediction(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = nn.ModuleDict(dict(seq_relationship=_linear(config, config.hidden_size, 2)))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, **packing):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        return_packed=True, **packing)
        logits = self.cls["seq_relationship"](out.pooler_output)  # (B, 2)
        loss = _cross_entropy(logits, labels) if labels is not None else None
        return NextSentencePredictorOutput(loss, logits)


class BertForSequenceClassification(BertPreTrainedModel):
    """Pooled [CLS] -> dropout -> linear (BERT), or the family's ClassificationHead on the first
    token. Loss as in HF: MSE when num_labels == 1 (regression), cross-entropy for integer
    labels, BCE-with-logits for float multi-label targets (config.problem_type, when set, decides)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        on_pooler = config.family.classifier == "pooler"
        self.bert = BertModel(config, add_pooling_layer=on_pooler)
        if on_pooler:
            p = config.classifier_dropout
            self.dropout = nn.Dropout(p if p is not None else config.hidden_dropout_prob)
            self.classifier = _linear(config, config.hidden_size, config.num_labels)
        elif config.family.classifier == "prediction_head":
            self.classifier = PredictionHeadClassifier(config)
        else:
            self.classifier = ClassificationHead(config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, **packing):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        return_packed=True, **packing)
        if self.bert.pooler is not None:
            logits = self.classifier(self.dropout(out.pooler_output))  # (B, num_labels)
        elif self.classifier.pooling == "mean":
            logits = self.classifier(_mean_rows(out, attention_mask))
        else:
            logits = self.classifier(_first_token_rows(out))
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                if self.num_labels == 1:
                    loss = F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
                else:
                    loss = F.mse_loss(logits, labels.to(logits.dtype))
            elif problem == "single_label_classification":
                loss = _cross_entropy(logits, labels)
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return SequenceClassifierOutput(loss, logits)


class BertForTokenClassification(BertPreTrainedModel):
    """A label per token (NER): dropout -> linear on each token's hidden state, or ModernBERT's
    prediction head (dense -> GELU -> LayerNorm -> dropout -> out_proj). Loss: cross-entropy over
    the labelled tokens (-100 is ignored), as in HF."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        if config.family.classifier == "prediction_head":
            self.dropout = nn.Identity()  # the head's own, after its norm
            self.classifier = PredictionHeadClassifier(config)
        else:
            p = config.classifier_dropout if config.family.classifier != "pre_classifier" \
                else None  # DistilBERT's is its dropout, not seq_classif_dropout
            self.dropout = nn.Dropout(p if p is not None else config.hidden_dropout_prob)
            self.classifier = _linear(config, config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, **packing):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        return_packed=True, **packing)
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (N, num_labels)
        loss = _cross_entropy(logits, out.packed.rows(labels)) if labels is not None else None
        return TokenClassifierOutput(loss, out.packed.grid(logits))  # logits (B, S, num_labels)


class BertForQuestionAnswering(BertPreTrainedModel):
    """Per-token start/end logits. loss = mean of the start and end cross-entropies; positions
    outside the sequence are clamped to S and ignored, as in HF. Unpadded (the default), padding
    positions are masked out of the span softmax (see span_loss); the padded path
    (config.unpad=False) normalises over them too, exactly as transformers does."""

    def __init__(self, config: BertConfig):
        if config.num_labels != 2:
            raise ValueError(f"BertForQuestionAnswering: config.num_labels expected 2 (start and "
                             f"end logits), got {config.num_labels}")
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.qa_dropout) if config.qa_dropout else nn.Identity()
        if config.family.classifier == "prediction_head":  # ModernBERT: dense, GELU, norm first
            self.qa_outputs = PredictionHeadClassifier(config)
        else:
            self.qa_outputs = _linear(config, config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None, **packing):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        return_packed=True, **packing)
        rows = self.dropout(out.last_hidden_state)
        logits = out.packed.grid(self.qa_outputs(rows))  # (B, S, num_labels)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            real = None  # padded path: normalised over every position, as in transformers
            if out.packed.indices is not None:  # unpadded: padding is never a span boundary
                real = out.packed.grid(rows.new_ones(rows.shape[0], dtype=torch.bool))
            loss = span_loss(start_logits, end_logits, start_positions, end_positions, real)
        return QuestionAnsweringModelOutput(loss, start_logits, end_logits)


@dataclass
class MultipleChoiceModelOutput(ModelOutput):
    loss: Optional[Tensor] = None
    logits: Tensor = None  # (B, num_choices)


class BertForMultipleChoice(BertPreTrainedModel):
    """One score per choice: input_ids (B, K, S) run as B * K sequences, each pooled (BERT:
    pooler -> dropout -> classifier; ModernBERT: its prediction head on the first token or the
    mean, classifier_pooling) to one logit; loss: cross-entropy over the K choices, as in HF."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        on_pooler = config.family.classifier == "pooler"
        self.bert = BertModel(config, add_pooling_layer=on_pooler)
        if on_pooler:
            p = config.classifier_dropout
            self.dropout = nn.Dropout(p if p is not None else config.hidden_dropout_prob)
            self.classifier = _linear(config, config.hidden_size, 1)
        else:
            self.classifier = PredictionHeadClassifier(config, num_labels=1)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, **packing):
        choices = input_ids.shape[1]
        flat = [t.reshape(-1, t.shape[-1]) if t is not None else None
                for t in (input_ids, attention_mask, token_type_ids, position_ids)]
        out = self.bert(*flat, return_packed=True, **packing)
        if self.bert.pooler is not None:
            logits = self.classifier(self.dropout(out.pooler_output))  # (B * K, 1)
        elif self.classifier.pooling == "mean":
            logits = self.classifier(_mean_rows(out, flat[1]))
        else:
            logits = self.classifier(_first_token_rows(out, flat[1]))
        logits = logits.view(-1, choices)
        loss = _cross_entropy(logits, labels) if labels is not None else None
        return MultipleChoiceModelOutput(loss, logits)


class BertLMHeadModel(BertPreTrainedModel):
    """Left-to-right LM: causal attention, the MLM head as the LM head, shifted loss
    (position i predicts labels[i + 1]), and greedy or sampled generation."""

    def __init__(self, config: BertConfig):
        # is_decoder: causal attention here, and in transformers when it loads our checkpoints
        super().__init__(dataclasses.replace(config, is_decoder=True, extra=dict(config.extra)))
        config = self.config
        self.bert = BertModel(config, add_pooling_layer=False)  # causal: config.is_decoder
        self.cls = nn.ModuleDict(dict(
            predictions=BertLMPredictionHead(config, self.bert.embeddings.word_embeddings)))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, past_key_values=None, return_logits: bool = True, **packing):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, past_key_values,
                        return_packed=True, **packing)
        # packed input (1, T): the collator's labels are -100 at each sequence's first token, so
        # the shift never predicts across a sequence boundary
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:] if labels is not None else None
        logits, loss, labelled = _token_logits(self.cls["predictions"], out, shifted, return_logits)
        return CausalLMOutput(loss, logits, labelled)  # logits (B, S, V)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, eos_token_id: Optional[int] = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 use_cache: bool = True):
        """Append up to max_new_tokens tokens to input_ids (B, S), one per step, greedy or sampled
        (temperature, top_k). A row that produced eos_token_id is finished and is padded with
        config.pad_token_id (eos when unset); generation stops when every row is finished.
        With use_cache, each layer keeps its keys/values, so a step runs only the newest token
        (attention with one query against the cache); once the sequence outgrows
        config.max_sequence_length the window slides and each step re-runs the last
        max_sequence_length tokens, as without the cache."""
        if temperature <= 0:
            raise ValueError(f"generate: argument 'temperature' expected > 0, got {temperature!r}")
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else eos_token_id
        ids = input_ids
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        caches = [{} for _ in self.bert.encoder.layer] if use_cache else None
        step_input = ids
        for _ in range(max_new_tokens):
            if ids.shape[1] > self.config.max_sequence_length:
                caches = None  # positions shift as the window slides: cached keys no longer fit
            if caches is None:
                step_input = ids[:, -self.config.max_sequence_length:]
            logits = self(step_input, past_key_values=caches).logits[:, -1, :].float()  # (B, V)
            if do_sample:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            else:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            if eos_token_id is not None:
                next_id = next_id.masked_fill(finished.unsqueeze(1), pad)
                finished |= next_id.squeeze(1) == eos_token_id
            ids = torch.cat([ids, next_id], dim=1)
            step_input = next_id  # (B, 1): all the cache needs next
            if eos_token_id is not None and bool(finished.all()):
                break
        return ids
