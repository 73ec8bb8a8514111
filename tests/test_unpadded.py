"""The unpadded model: padded and packed runs agree on real tokens (outputs and every gradient),
packed input as transformers' DataCollatorWithFlattening makes it, the MLM/LM decoder at labelled
positions only, and the sinusoidal position table."""
import math
import warnings

import pytest
import torch

import fastbert
from fastbert.heads import (BertForMaskedLM, BertForPreTraining, BertForQuestionAnswering,
                            BertForSequenceClassification, BertLMHeadModel)
from fastbert.model import BertConfig, BertModel, sinusoidal_table
from tests.helpers import assert_fp32_close

SMALL = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)
LENGTHS = [9, 4, 1, 7]


def batch(lengths=LENGTHS, s=9):
    mask = torch.arange(s).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    ids = torch.randint(1, 100, (len(lengths), s)).masked_fill(~mask, 0)
    return ids, mask


def labels_for(head, ids, mask):
    b = ids.shape[0]
    token_labels = torch.where((torch.rand(ids.shape) < 0.4) & mask, ids, -100)
    token_labels[:, 0] = ids[:, 0]
    if head is BertForPreTraining:
        return dict(labels=token_labels, next_sentence_label=torch.randint(0, 2, (b,)))
    if head in (BertForMaskedLM, BertLMHeadModel):
        return dict(labels=token_labels)
    if head is BertForSequenceClassification:
        return dict(labels=torch.randint(0, 2, (b,)))
    return dict(start_positions=torch.randint(0, 9, (b,)), end_positions=torch.randint(0, 9, (b,)))


def loss_outputs_grads(model, inputs, real):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    fields = {}
    for name, value in zip(("loss", "a", "b", "c"), out.to_tuple()):
        fields[name] = value[real] if value.dim() >= 2 and value.shape[:2] == real.shape else value
    return fields, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", [BertForPreTraining, BertForMaskedLM, BertLMHeadModel,
                                  BertForSequenceClassification, BertForQuestionAnswering])
def test_padded_and_unpadded_agree_on_real_tokens_and_every_gradient(head):
    model = head(BertConfig(**SMALL)).double()  # fp64: the two paths differ by rounding only
    ids, mask = batch()
    if head is BertForQuestionAnswering:  # the span loss normalises over padding positions too
        ids, mask = batch([9, 9, 9, 9])
    inputs = dict(input_ids=ids, attention_mask=mask, **labels_for(head, ids, mask))
    model.config.unpad = False
    padded, padded_grads = loss_outputs_grads(model, inputs, mask)
    model.config.unpad = True
    packed, packed_grads = loss_outputs_grads(model, inputs, mask)
    assert padded.keys() == packed.keys()
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-10, atol=1e-10, msg=name)
    assert padded_grads.keys() == packed_grads.keys()
    for name, g in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-9, atol=1e-10, msg=name)


def test_unpadded_output_is_zero_at_padding_and_return_packed_gives_rows():
    model = BertModel(BertConfig(**SMALL)).eval()
    ids, mask = batch()
    out = model(ids, mask)
    assert out.last_hidden_state.shape == (4, 9, 64)
    assert (out.last_hidden_state[~mask] == 0).all()
    rows = model(ids, mask, return_packed=True)
    assert rows.last_hidden_state.shape == (sum(LENGTHS), 64)
    torch.testing.assert_close(rows.packed.grid(rows.last_hidden_state), out.last_hidden_state)
    assert rows.packed.cu_seqlens.tolist() == [0, 9, 13, 14, 21]


def test_left_padding_and_an_empty_row():
    model = BertModel(BertConfig(**SMALL)).eval()
    ids, _ = batch()
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, :5] = False  # left padding
    mask[2] = False  # no real token at all
    padded = model(ids, mask, unpad=False)
    packed = model(ids, mask)
    real = mask.clone()
    torch.testing.assert_close(packed.last_hidden_state[real], padded.last_hidden_state[real])
    assert torch.isfinite(packed.pooler_output).all()
    torch.testing.assert_close(packed.pooler_output[[0, 3]], padded.pooler_output[[0, 3]])


def flattened(ids, mask):
    """What DataCollatorWithFlattening makes of a padded batch: (1, T) ids and positions."""
    rows = [ids[b, :int(mask[b].sum())] for b in range(ids.shape[0])]
    packed_ids = torch.cat(rows).unsqueeze(0)
    positions = torch.cat([torch.arange(len(r)) for r in rows]).unsqueeze(0)
    return packed_ids, positions


def test_packed_input_from_position_ids_or_cu_seqlens_equals_padded():
    model = BertForPreTraining(BertConfig(**SMALL)).eval()
    ids, mask = batch()
    padded = model(ids, mask)
    packed_ids, positions = flattened(ids, mask)
    by_positions = model(packed_ids, position_ids=positions)
    cu = torch.tensor([0, 9, 13, 14, 21], dtype=torch.int32)
    by_cu = model(packed_ids, cu_seqlens=cu, max_seqlen=9)
    for out in (by_positions, by_cu):
        assert out.prediction_logits.shape == (1, 21, 100)
        assert_fp32_close(out.prediction_logits[0], padded.prediction_logits[mask], "logits")
        assert_fp32_close(out.seq_relationship_logits, padded.seq_relationship_logits, "nsp")


def test_transformers_data_collator_with_flattening():
    transformers = pytest.importorskip("transformers")
    model = BertForMaskedLM(BertConfig(**SMALL)).eval()
    ids, mask = batch()
    features = [{"input_ids": ids[b, :int(mask[b].sum())].tolist()} for b in range(4)]
    collated = transformers.DataCollatorWithFlattening(return_tensors="pt")(features)
    out = model(collated["input_ids"], position_ids=collated["position_ids"],
                labels=collated["labels"])
    padded = model(ids, mask)
    assert_fp32_close(out.logits[0], padded.logits[mask], "logits")
    # the collator's labels: the ids, -100 at each sequence's first token
    labels = collated["labels"][0]
    want = torch.nn.functional.cross_entropy(padded.logits[mask][labels != -100],
                                             labels[labels != -100])
    assert_fp32_close(out.loss, want, "loss")


@pytest.mark.parametrize("head", [BertForPreTraining, BertForMaskedLM, BertLMHeadModel])
def test_decoder_at_labelled_positions_only_gives_the_same_loss_and_grads(head, monkeypatch):
    model = head(BertConfig(**SMALL))
    ids, mask = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, **labels_for(head, ids, mask))
    full, full_grads = loss_outputs_grads(model, inputs, mask)
    decoder = model.cls["predictions"].decoder
    rows_seen = []
    monkeypatch.setattr(decoder, "forward",
                        lambda x: rows_seen.append(x.shape[0]) or torch.nn.Linear.forward(decoder, x))
    model.zero_grad()
    out = model(**inputs, return_logits=False)
    out.loss.backward()
    labels = inputs["labels"]
    targets = labels if head is not BertLMHeadModel else \
        torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    assert rows_seen == [int((targets != -100).sum())]  # the decoder ran on labelled rows only
    assert getattr(out, "logits", None) is None and getattr(out, "prediction_logits", None) is None
    assert_fp32_close(out.loss, full["loss"], "loss")
    full_logits = model(**{k: v for k, v in inputs.items()}).to_tuple()[1]
    assert_fp32_close(out.labelled_logits, full_logits[targets != -100], "labelled logits")
    for name, p in model.named_parameters():
        assert_fp32_close(p.grad, full_grads[name], name)


def test_sinusoidal_table_matches_the_formula_and_is_not_a_weight(tmp_path):
    table = sinusoidal_table(50, 16).double()
    pos = torch.arange(50, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(8, dtype=torch.float64)
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * i / 16)
    torch.testing.assert_close(table[:, 0::2], torch.sin(angle), rtol=0, atol=1e-7)
    torch.testing.assert_close(table[:, 1::2], torch.cos(angle), rtol=0, atol=1e-7)
    config = BertConfig(**{**SMALL, "position_embedding_type": "sinusoidal",
                           "max_position_embeddings": 8})
    model = BertForMaskedLM(config).eval()
    assert not any("position" in k for k in model.state_dict())
    ids = torch.randint(1, 100, (2, 20))  # longer than the 8-entry table: it extends
    out = model(ids).logits
    assert out.shape == (2, 20, 100) and torch.isfinite(out).all()
    with pytest.warns(UserWarning, match="transformers cannot"):
        model.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = BertForMaskedLM.from_pretrained(str(tmp_path)).eval()
    assert loaded.config.position_embedding_type == "sinusoidal"
    torch.testing.assert_close(loaded(ids).logits, out)


def test_sinusoidal_positions_reach_the_output():
    config = BertConfig(**{**SMALL, "position_embedding_type": "sinusoidal"})
    model = BertModel(config).eval()
    ids = torch.full((1, 6), 5)  # the same token everywhere: only positions tell them apart
    out = model(ids).last_hidden_state[0]
    assert (out[1:] - out[:1]).abs().amax(-1).min() > 1e-3
    emb = model.embeddings
    want = emb.word_embeddings.weight[5] + emb.token_type_embeddings.weight[0] \
        + sinusoidal_table(64, 64)[:6]
    got = emb(ids)[0]  # LayerNorm of the sum
    want = torch.nn.functional.layer_norm(want, (64,), emb.LayerNorm.weight, emb.LayerNorm.bias,
                                          emb.LayerNorm.eps)
    torch.testing.assert_close(got, want)
    assert math.isclose(float(emb.position_table[3, 0]), math.sin(3.0), rel_tol=1e-6)


@pytest.mark.gpu
def test_host_syncs_per_forward_on_gpu():
    """Explicit cu_seqlens: no host sync at all; a padded batch: one (the real-token count)."""
    model = BertForMaskedLM(BertConfig(**SMALL)).cuda().eval()
    ids, mask = batch()
    packed_ids, _ = flattened(ids, mask)
    cu = torch.tensor([0, 9, 13, 14, 21], dtype=torch.int32, device="cuda")
    ids, mask, packed_ids = ids.cuda(), mask.cuda(), packed_ids.cuda()
    with torch.no_grad():
        model(packed_ids, cu_seqlens=cu, max_seqlen=9)  # warm-up: kernels compiled, tuned
        model(ids, mask)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as packed_syncs:
                warnings.simplefilter("always")
                model(packed_ids, cu_seqlens=cu, max_seqlen=9)
            with warnings.catch_warnings(record=True) as padded_syncs:
                warnings.simplefilter("always")
                model(ids, mask)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    def syncs(records):
        return [str(w.message) for w in records if "synchroniz" in str(w.message)]
    assert syncs(packed_syncs) == []
    assert len(syncs(padded_syncs)) <= 1, syncs(padded_syncs)


@pytest.mark.gpu
def test_packed_inference_is_capturable_by_cuda_graphs():
    model = BertModel(BertConfig(**SMALL)).cuda().eval()
    ids, mask = batch()
    packed_ids = flattened(ids, mask)[0].cuda()
    cu = torch.tensor([0, 9, 13, 14, 21], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        want = model(packed_ids, cu_seqlens=cu, max_seqlen=9).last_hidden_state
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (kernels compiled, tuned)
            for _ in range(2):
                model(packed_ids, cu_seqlens=cu, max_seqlen=9)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = model(packed_ids, cu_seqlens=cu, max_seqlen=9).last_hidden_state
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(got, want)
