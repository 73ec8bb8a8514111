"""The model and heads on their own (no transformers): config, state-dict hooks, the fused QKV,
dropout, padding, losses, generate, torch.compile, and the whole model on the Triton backend
(interpreter and GPU tiers). The comparison with transformers is test_hf.py."""
import json

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import lean
from fastbert.heads import (BertForMaskedLM, BertForPreTraining, BertForQuestionAnswering,
                            BertForSequenceClassification, BertLMHeadModel)
from fastbert.model import BertConfig, BertModel
from tests.helpers import assert_close_by_rule, random_padding_mask

SMALL = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=64)


def small_config(**kw):
    return BertConfig(**{**SMALL, **kw})


def random_batch(b=3, s=9, vocab=100):
    return torch.randint(1, vocab, (b, s)), random_padding_mask(b, s, mode="third")


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

def test_config_json_round_trip_keeps_unknown_fields(tmp_path):
    raw = {**SMALL, "hidden_act": "gelu_new", "model_type": "bert", "use_cache": True,
           "something_new": [1, 2], "id2label": {"0": "neg", "1": "neu", "2": "pos"},
           "label2id": {"neg": 0, "neu": 1, "pos": 2}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = BertConfig.from_pretrained(str(tmp_path), hidden_dropout_prob=0.3)
    assert config.hidden_act == "gelu_new" and config.gelu_approximate == "tanh"
    assert config.num_labels == 3 and config.hidden_dropout_prob == 0.3
    assert config.extra["something_new"] == [1, 2]
    config.save_pretrained(str(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["something_new"] == [1, 2] and written["use_cache"] is True
    assert written["id2label"] == raw["id2label"] and written["hidden_dropout_prob"] == 0.3
    assert BertConfig.from_pretrained(str(tmp_path / "out")) == config


def test_config_num_labels_written_as_id2label():
    d = small_config(num_labels=5).to_dict()
    assert "num_labels" not in d and len(d["id2label"]) == 5 and d["model_type"] == "bert"
    assert BertConfig.from_dict(d).num_labels == 5


@pytest.mark.parametrize("kw, words", [
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(num_attention_heads=5), "multiple of num_attention_heads"),
    (dict(hidden_size=512, num_attention_heads=1), "head dim"),
])
def test_config_errors(kw, words):
    with pytest.raises(ValueError, match=words):
        small_config(**kw)


def test_question_answering_needs_two_labels():
    with pytest.raises(ValueError, match="num_labels expected 2"):
        BertForQuestionAnswering(small_config(num_labels=3))


# --------------------------------------------------------------------------------------------
# model structure
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("unpad", [False, True])
def test_qkv_views_reach_attention_without_copies(monkeypatch, unpad):
    """Through the lean path (fastbert/lean.py), whose plan carries cu_seqlens or the mask."""
    model = BertModel(small_config(unpad=unpad)).eval()
    seen = []
    real_attention = lean.attention

    def spy(plan, q, k, v):
        seen.append((plan, q, k, v))
        return real_attention(plan, q, k, v)

    monkeypatch.setattr(lean, "attention", spy)
    ids, mask = random_batch()
    model(ids, attention_mask=mask)
    assert len(seen) == SMALL["num_hidden_layers"]
    for plan, q, k, v in seen:
        # padded (B, S, nh, hd), or unpadded (T, nh, hd) with T the real tokens only
        assert q.shape == ((int(mask.sum()), 4, 16) if unpad else (3, 9, 4, 16))
        assert q.stride(-1) == 1
        # one (..., 3, nh, hd) buffer: k and v start one and two hidden widths after q
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() \
            == v.untyped_storage().data_ptr()
        assert k.data_ptr() - q.data_ptr() == 64 * q.element_size()
        assert v.data_ptr() - q.data_ptr() == 128 * q.element_size()
        assert plan.causal is False and plan.attn_p == 0.0
        if unpad:
            assert plan.cu_seqlens.tolist() == [0, *torch.cumsum(mask.sum(1), 0).tolist()]
        else:
            assert torch.equal(plan.mask, mask)


def test_state_dict_round_trip_and_hf_key_names():
    model = BertForPreTraining(small_config()).eval()
    state = model.state_dict()
    assert "bert.encoder.layer.1.attention.self.key.bias" in state
    assert not any("qkv" in k for k in state)
    assert state["bert.encoder.layer.0.attention.self.value.weight"].shape == (64, 64)
    other = BertForPreTraining(small_config())
    other.load_state_dict(state, strict=True)
    ids, mask = random_batch()
    torch.testing.assert_close(other.eval()(ids, mask).prediction_logits,
                               model(ids, mask).prediction_logits, rtol=0, atol=0)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_state_dict_reports_missing_and_unexpected():
    model = BertModel(small_config())
    state = model.state_dict()
    state.pop("encoder.layer.0.attention.self.query.weight")
    state["encoder.layer.0.surprise"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="surprise"):
        model.load_state_dict(state)


def test_mlm_decoder_is_tied_to_word_embeddings():
    model = BertForMaskedLM(small_config())
    assert model.cls["predictions"].decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.bert.pooler is None


def test_dropout_on_in_train_off_in_eval():
    model = BertForMaskedLM(small_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2))
    ids, mask = random_batch()
    model.train()
    a, b = model(ids, mask).logits, model(ids, mask).logits
    assert not torch.allclose(a, b)
    torch.manual_seed(1)
    c = model(ids, mask).logits
    torch.manual_seed(1)
    torch.testing.assert_close(model(ids, mask).logits, c, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model(ids, mask).logits, model(ids, mask).logits, rtol=0, atol=0)


def test_padding_does_not_leak_and_empty_rows_are_finite():
    model = BertModel(small_config()).eval()
    ids, _ = random_batch(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    full = model(ids, mask).last_hidden_state
    # changing padded tokens must not change the real positions
    ids2 = ids.clone()
    ids2[0, 5:] = 7
    torch.testing.assert_close(model(ids2, mask).last_hidden_state[0, :5], full[0, :5])
    # and a 5-token row without padding gives the same hidden states
    torch.testing.assert_close(model(ids[:1, :5]).last_hidden_state[0], full[0, :5],
                               rtol=1e-5, atol=1e-5)
    empty = torch.zeros(2, 8, dtype=torch.bool)
    out = model(ids, empty)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()


def test_causal_lm_does_not_see_the_future():
    model = BertLMHeadModel(small_config()).eval()
    ids, _ = random_batch(2, 8)
    ids2 = ids.clone()
    ids2[:, 6:] = 3
    torch.testing.assert_close(model(ids).logits[:, :6], model(ids2).logits[:, :6])


# --------------------------------------------------------------------------------------------
# losses (HF conventions; the full comparison against transformers is in test_hf.py)
# --------------------------------------------------------------------------------------------

def test_mlm_loss_ignores_minus_100():
    model = BertForMaskedLM(small_config()).eval()
    ids, mask = random_batch()
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[2, 0] = 5, 17
    out = model(ids, mask, labels=labels)
    logits = out.logits
    expected = (F.cross_entropy(logits[0, 2], torch.tensor(5))
                + F.cross_entropy(logits[2, 0], torch.tensor(17))) / 2
    torch.testing.assert_close(out.loss, expected)
    assert out[0] is out.loss and out[1] is out.logits  # HF-style tuple indexing


def test_mlm_batch_without_a_labelled_token_gives_nan_as_transformers():
    """No label set anywhere (a short batch the 15 % masking left untouched): the decoder runs on
    zero rows, and the loss is NaN as torch's mean over nothing (transformers' too), where the
    CPU GEMM's view of zero rows raised."""
    model = BertForMaskedLM(small_config()).eval()
    ids, mask = random_batch()
    labels = torch.full_like(ids, -100)
    for grad in (False, True):  # the CPU inference GEMM (no autograd) and F.linear
        for kw in ({}, dict(return_logits=False)):
            with torch.set_grad_enabled(grad):
                out = model(ids, mask, labels=labels, **kw)
            assert torch.isnan(out.loss), (grad, kw)


def test_inputs_the_model_cannot_take_are_refused_by_name():
    """A mask of another shape than the ids (packing would misplace or drop rows) and a row
    longer than the learned position table, refused before anything runs."""
    model = BertModel(small_config()).eval()
    ids, mask = random_batch()
    for bad in (mask[:, :-2], mask[:2]):
        with pytest.raises(ValueError, match="'attention_mask' expected shape"):
            model(ids, bad)
    long = torch.randint(1, 100, (2, SMALL["max_position_embeddings"] + 1))
    with pytest.raises(ValueError, match="'input_ids' expected at most 64 tokens"):
        model(long)


def test_causal_lm_loss_is_shifted():
    model = BertLMHeadModel(small_config()).eval()
    ids, _ = random_batch(2, 6)
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_sequence_classification_regression_uses_mse():
    model = BertForSequenceClassification(small_config(num_labels=1)).eval()
    ids, mask = random_batch()
    target = torch.randn(3)
    out = model(ids, mask, labels=target)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), target))


def test_question_answering_clamps_out_of_range_positions():
    model = BertForQuestionAnswering(small_config()).eval()
    ids, mask = random_batch()
    start, end = torch.tensor([1, 50, 3]), torch.tensor([2, 4, 99])
    mask[:, :5] = True  # the in-range labels sit at real tokens
    out = model(ids, mask, start_positions=start, end_positions=end)
    # unpadded: padding is masked out of the span softmax (it cannot be a boundary)
    real = mask.bool()
    start_logits, end_logits = (t.masked_fill(~real, torch.finfo(t.dtype).min)
                                for t in (out.start_logits, out.end_logits))
    s_loss = F.cross_entropy(start_logits[[0, 2]], start[[0, 2]])
    e_loss = F.cross_entropy(end_logits[[0, 1]], end[[0, 1]])
    torch.testing.assert_close(out.loss, (s_loss + e_loss) / 2)


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------

def test_generate_greedy_matches_argmax_of_forward():
    model = BertLMHeadModel(small_config()).eval()
    prompt, _ = random_batch(2, 4)
    out = model.generate(prompt, max_new_tokens=5)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], prompt)
    for t in range(4, 9):
        torch.testing.assert_close(model(out[:, :t]).logits[:, -1].argmax(-1), out[:, t])


def test_generate_stops_at_eos_and_pads_finished_rows():
    model = BertLMHeadModel(small_config(pad_token_id=0)).eval()
    prompt, _ = random_batch(2, 4)
    greedy = model.generate(prompt, max_new_tokens=6)
    eos = int(greedy[0, 4])  # row 0 emits this first
    out = model.generate(prompt, max_new_tokens=6, eos_token_id=eos)
    assert out[0, 4] == eos and (out[0, 5:] == 0).all()
    row1_eos = (greedy[1, 4:] == eos).nonzero()
    if len(row1_eos) == 0:  # row 1 never ends: generation runs to max_new_tokens
        assert out.shape[1] == 10 and torch.equal(out[1], greedy[1])
    else:  # generation stops once both rows are done
        assert out.shape[1] == 4 + int(row1_eos[0]) + 1


def test_generate_sampling_with_top_k_1_is_greedy():
    model = BertLMHeadModel(small_config()).eval()
    prompt, _ = random_batch(2, 3)
    sampled = model.generate(prompt, max_new_tokens=4, do_sample=True, temperature=0.7, top_k=1)
    torch.testing.assert_close(sampled, model.generate(prompt, max_new_tokens=4))
    torch.manual_seed(3)
    a = model.generate(prompt, max_new_tokens=4, do_sample=True)
    torch.manual_seed(3)
    torch.testing.assert_close(model.generate(prompt, max_new_tokens=4, do_sample=True), a)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, max_new_tokens=1, do_sample=True, temperature=0.0)


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("head", [BertForPreTraining, BertLMHeadModel])
def test_torch_compile_fullgraph_matches_eager(head, unpad):
    # packing a padded batch has a data-dependent token count: traced when dynamo captures such
    # ops, otherwise the compiled model runs padded
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=unpad):
        _compiled_matches_eager(head)


def _compiled_matches_eager(head):
    torch._dynamo.reset()
    model = head(small_config()).eval()
    ids, mask = random_batch()
    labels = torch.randint(0, 100, ids.shape).masked_fill(~mask, -100)
    kw = dict(labels=labels) if head is BertLMHeadModel else \
        dict(labels=labels, next_sentence_label=torch.tensor([0, 1, 0]))
    eager = model(ids, mask, **kw)
    eager.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(ids, mask, **kw)
    got.loss.backward()
    torch.testing.assert_close(got.loss, eager.loss)
    torch.testing.assert_close(got.to_tuple()[1][mask], eager.to_tuple()[1][mask])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


# --------------------------------------------------------------------------------------------
# the model on the kernel backends (the ops' own tests cover the kernels in depth)
# --------------------------------------------------------------------------------------------

def _run_on_backend(model, backend, dtype, inputs):
    """Loss, logits and parameter grads of `model` cast to dtype, with every op on `backend`."""
    previous = fastbert.get_backend()
    try:
        fastbert.set_backend(backend)
        m = model.to(dtype)
        m.zero_grad(set_to_none=True)
        out = m(**inputs)
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
        return out.loss.detach(), out.to_tuple()[1].detach().clone(), grads
    finally:
        fastbert.set_backend(previous)


@pytest.mark.interpreter
@pytest.mark.parametrize("head", [BertForPreTraining, BertLMHeadModel])
def test_model_on_triton_interpreter_matches_torch_backend(head):
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = head(config).eval()
    ids = torch.randint(1, 50, (2, 7))
    inputs = dict(input_ids=ids, attention_mask=random_padding_mask(2, 7, mode="third"),
                  labels=ids.clone())
    if head is BertForPreTraining:
        inputs["next_sentence_label"] = torch.tensor([0, 1])
    kernel = _run_on_backend(model, "triton", torch.float32, inputs)
    exact = _run_on_backend(model, "torch", torch.float32, inputs)
    torch.testing.assert_close(kernel[0], exact[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel[1], exact[1], rtol=1e-5, atol=1e-5)
    for name, g in kernel[2].items():
        torch.testing.assert_close(g, exact[2][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head", [BertForPreTraining, BertLMHeadModel])
def test_model_on_triton_gpu_by_tolerance_rule(head, dtype):
    config = BertConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=1024, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = head(config).cuda().eval()
    ids = torch.randint(1, 512, (3, 70), device="cuda")
    inputs = dict(input_ids=ids, attention_mask=random_padding_mask(3, 70, "cuda", mode="third"),
                  labels=ids.clone())
    if head is BertForPreTraining:
        inputs["next_sentence_label"] = torch.tensor([0, 1, 1], device="cuda")
    kernel = _run_on_backend(model, "triton", dtype, inputs)
    plain = _run_on_backend(model, "torch", dtype, inputs)
    exact = _run_on_backend(model, "torch", torch.float64, inputs)
    assert_close_by_rule(kernel[0], plain[0], exact[0], "loss", factor=3.0)
    assert_close_by_rule(kernel[1], plain[1], exact[1], "logits", factor=3.0)
    for name, g in kernel[2].items():
        assert torch.isfinite(g).all(), name
        assert_close_by_rule(g, plain[2][name], exact[2][name], f"grad {name}", factor=3.0,
                             floor=2e-2 * exact[2][name].abs().max().item())
