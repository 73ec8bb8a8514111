"""Tier 1: fastbert's own classes on ModernBERT folders (issue 20). A transformers ModernBERT
checkpoint (tiny random config, local window shorter than the sequence) loads into BertModel,
BertForMaskedLM (sparse_prediction too), BertForSequenceClassification (cls and mean pooling),
BertForTokenClassification, BertForQuestionAnswering and BertForMultipleChoice with nothing
missing or ignored and gives the same outputs at real tokens, loss and every gradient by the tolerance rule (fastbert fp32 vs
transformers fp32, both against transformers fp64), unpadded (the default), on the padded path
and on packed input; what fastbert saves loads into transformers' ModernBERT classes with nothing
missing or unexpected."""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.modernbert import modeling_modernbert as mb  # noqa: E402

import fastbert  # noqa: E402
from fastbert import cuda as cuda_backend  # noqa: E402
from fastbert import data, lean  # noqa: E402
from fastbert.family import FAMILIES  # noqa: E402
from fastbert.model import BertConfig  # noqa: E402
from tests.helpers import assert_close_by_rule  # noqa: E402
from tests.test_model import _run_on_backend  # noqa: E402
from tests.test_hf import grads_by_hf_name  # noqa: E402
from tests.test_hf_modernbert import (SEQ, masks_of_other_shapes, packed_batch,  # noqa: E402
                                      padded_batch, tiny_config)

FAMILY = FAMILIES["modernbert"]
# transformers' class -> fastbert's
OURS = {mb.ModernBertModel: "BertModel", mb.ModernBertForMaskedLM: "BertForMaskedLM",
        mb.ModernBertForSequenceClassification: "BertForSequenceClassification",
        mb.ModernBertForTokenClassification: "BertForTokenClassification",
        mb.ModernBertForQuestionAnswering: "BertForQuestionAnswering",
        mb.ModernBertForMultipleChoice: "BertForMultipleChoice"}
HEADS = [(mb.ModernBertModel, {}), (mb.ModernBertForMaskedLM, {}),
         (mb.ModernBertForMaskedLM, dict(sparse_prediction=True)),
         (mb.ModernBertForSequenceClassification, dict(classifier_pooling="cls")),
         (mb.ModernBertForSequenceClassification, dict(classifier_pooling="mean")),
         (mb.ModernBertForTokenClassification, {}),
         (mb.ModernBertForQuestionAnswering, dict(num_labels=2)),
         (mb.ModernBertForMultipleChoice, dict(classifier_pooling="cls")),
         (mb.ModernBertForMultipleChoice, dict(classifier_pooling="mean")),
         # every bias the config can switch on, the decoder's off
         (mb.ModernBertForMaskedLM, dict(norm_bias=True, attention_bias=True, mlp_bias=True,
                                         decoder_bias=False)),
         (mb.ModernBertForSequenceClassification, dict(norm_bias=True, attention_bias=True,
                                                       mlp_bias=True, classifier_bias=True))]


def _hf_model(cls, **overrides):
    """A random transformers model in training mode (dropout is 0 in the config), its weights
    moved off their initial values (LayerNorm weights of one, ...)."""
    torch.manual_seed(0)
    model = cls(tiny_config(**overrides)).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _load_ours(cls, path, **overrides):
    with warnings.catch_warnings(record=True) as record:  # nothing missing, nothing ignored
        warnings.simplefilter("always")
        ours = getattr(fastbert, OURS[cls]).from_pretrained(str(path), **overrides)
    assert not [w for w in record if "from_pretrained" in str(w.message)], \
        [str(w.message) for w in record]
    assert ours.config.model_type == "modernbert"
    return ours.train()


def _inputs(cls, ids, mask):
    """The head's inputs with labels on the padded grid (-100 at padding)."""
    inputs = dict(input_ids=ids, attention_mask=mask)
    if cls is mb.ModernBertForMaskedLM:
        chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.4
        inputs["labels"] = torch.where(chosen & mask.bool(), ids, -100)
    elif cls is mb.ModernBertForSequenceClassification:
        inputs["labels"] = torch.tensor([0, 2, 1])[:ids.shape[0]]
    elif cls is mb.ModernBertForTokenClassification:
        labels = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(5))
        inputs["labels"] = labels.masked_fill(mask == 0, -100)
    elif cls is mb.ModernBertForQuestionAnswering:
        # transformers' span loss runs over every position, padding included (fastbert's
        # unpadded one masks padding out, heads.span_loss): the loss on a batch without padding
        inputs.update(attention_mask=torch.ones_like(mask), start_positions=torch.tensor(
            [1, 3, 2])[:ids.shape[0]], end_positions=torch.tensor([4, 9, 5])[:ids.shape[0]])
    elif cls is mb.ModernBertForMultipleChoice:  # (2 questions, 2 choices, S): padded choices
        inputs.update(input_ids=torch.cat([ids, ids.flip(0)])[:4].view(2, 2, -1),
                      attention_mask=torch.cat([mask, mask.flip(0)])[:4].view(2, 2, -1),
                      labels=torch.tensor([1, 0]))
    return inputs


def _run(model, inputs, real):
    """(outputs at real tokens by name, gradients by the checkpoint's parameter names)."""
    model.zero_grad()
    out = model(**inputs)
    if getattr(out, "loss", None) is None:  # the base model: a fixed projection of real tokens
        h = out.last_hidden_state[real]
        weights = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(h.dtype)
        loss, fields = (h * weights).sum(), {"last_hidden_state": h}
    else:  # per-token outputs at real tokens; sparse MLM logits (M, V) and the others whole
        loss, fields = out.loss, {"loss": out.loss}
        for name in ("logits", "start_logits", "end_logits"):
            value = getattr(out, name, None)
            if value is not None:
                on_grid = value.shape[:real.dim()] == real.shape
                fields[name] = value[real] if on_grid else value
    loss.backward()
    if isinstance(model, transformers.PreTrainedModel):
        grads = {n: p.grad for n, p in model.named_parameters()}
    else:
        grads = FAMILY.to_checkpoint(grads_by_hf_name(model), bare=not hasattr(model, "bert"))
    return {k: v.detach() for k, v in fields.items()}, grads


def _agree(ours, hf_model, inputs, real, ref_inputs=None, ref_real=None):
    if ref_inputs is None:
        ref_inputs, ref_real = inputs, real
    got, got_grads = _run(ours, inputs, real)
    plain, plain_grads = _run(hf_model, ref_inputs, ref_real)
    exact, exact_grads = _run(copy.deepcopy(hf_model).double(), ref_inputs, ref_real)
    assert set(got) == set(plain), (set(got), set(plain))
    for name in plain:
        assert_close_by_rule(got[name], plain[name], exact[name], name)
    # ours also names the tied decoder weight (transformers lists the word embeddings only)
    assert plain_grads.keys() <= got_grads.keys(), plain_grads.keys() - got_grads.keys()
    for name, g in plain_grads.items():
        assert g is not None, name
        assert_close_by_rule(got_grads[name], g, exact_grads[name], f"d{name}")


@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("cls,overrides", HEADS)
def test_checkpoint_loads_and_matches_transformers(cls, overrides, unpad, tmp_path):
    hf_model = _hf_model(cls, **overrides)
    hf_model.save_pretrained(str(tmp_path))
    ours = _load_ours(cls, tmp_path, unpad=unpad)
    ids, mask = padded_batch()
    _agree(ours, hf_model, _inputs(cls, ids, mask), mask.bool())


@pytest.mark.parametrize("unpad", [True, False])
def test_multiple_choice_pools_each_choice_first_real_token(unpad, tmp_path):
    """Left-padded choices: transformers' multiple choice pools each row's first real token
    (attention_mask.argmax), the padded path as well as the unpadded one."""
    cls = mb.ModernBertForMultipleChoice
    hf_model = _hf_model(cls, classifier_pooling="cls")
    hf_model.save_pretrained(str(tmp_path))
    ours = _load_ours(cls, tmp_path, unpad=unpad)
    ids, mask = padded_batch()
    ids, mask = ids.flip(1), mask.flip(1)  # padding on the left
    assert not mask[:, 0].all()
    _agree(ours, hf_model, _inputs(cls, ids, mask), mask.bool())


@pytest.mark.parametrize("unpad", [True, False])
def test_left_padding_and_padding_between_real_tokens(unpad, tmp_path):
    """As transformers: padding between real tokens keeps the window counting positions (the
    unpadded model takes its padded path for such a batch, where the window is shorter)."""
    hf_model = _hf_model(mb.ModernBertModel)
    hf_model.save_pretrained(str(tmp_path))
    ours = _load_ours(mb.ModernBertModel, tmp_path, unpad=unpad)
    for _, ids, mask in masks_of_other_shapes():
        _agree(ours, hf_model, _inputs(mb.ModernBertModel, ids, mask), mask.bool())


@pytest.mark.parametrize("cls", [mb.ModernBertModel, mb.ModernBertForMaskedLM])
def test_packed_input_matches_the_padded_batch(cls, tmp_path):
    """DataCollatorWithFlattening's (1, T) ids with restarting position ids against transformers
    on the same sequences padded (its sdpa path lets packed sequences see each other)."""
    hf_model = _hf_model(cls)
    hf_model.save_pretrained(str(tmp_path))
    ours = _load_ours(cls, tmp_path)
    ids, position_ids, padded, mask = packed_batch()
    inputs, ref_inputs = dict(input_ids=ids, position_ids=position_ids), _inputs(cls, padded, mask)
    if "labels" in ref_inputs:
        inputs["labels"] = ref_inputs["labels"][mask][None]
    _agree(ours, hf_model, inputs, torch.ones_like(ids, dtype=torch.bool), ref_inputs, mask)
    # the same packing given as cu_seqlens: no host sync, the same result
    lengths = mask.sum(1)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    torch.testing.assert_close(ours(ids, cu_seqlens=cu, max_seqlen=SEQ)[0],
                               ours(ids, position_ids=position_ids)[0])


def test_sparse_prediction_ignore_index(tmp_path):
    """config.sparse_prediction with sparse_pred_ignore_index other than -100: the logits at the
    rows whose label is not that index, the loss over them ignoring -100, as transformers."""
    hf_model = _hf_model(mb.ModernBertForMaskedLM, sparse_prediction=True,
                         sparse_pred_ignore_index=5)
    hf_model.save_pretrained(str(tmp_path))
    ours = _load_ours(mb.ModernBertForMaskedLM, tmp_path)
    ids, mask = padded_batch()
    labels = _inputs(mb.ModernBertForMaskedLM, ids, mask)["labels"]
    # 5 at padding (transformers selects every grid position whose label is not 5, padding
    # included; fastbert's rows are the real tokens) and at every third real token
    labels = labels.masked_fill((torch.arange(ids.shape[1]) % 3 == 0) | ~mask.bool(), 5)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    _agree(ours, hf_model, inputs, mask.bool())
    assert ours(**inputs).logits.shape[0] == int((labels != 5).sum())


def test_masked_lm_at_labelled_positions_only(tmp_path):
    """return_logits=False (transformers' sparse_prediction): the same loss, the decoder run at
    the labelled rows only."""
    hf_model = _hf_model(mb.ModernBertForMaskedLM)
    hf_model.save_pretrained(str(tmp_path))
    ours = _load_ours(mb.ModernBertForMaskedLM, tmp_path)
    ids, mask = padded_batch()
    inputs = _inputs(mb.ModernBertForMaskedLM, ids, mask)
    sparse = ours(**inputs, return_logits=False)
    full = ours(**inputs)
    assert sparse.logits is None
    torch.testing.assert_close(sparse.loss, full.loss)
    labels = inputs["labels"]
    torch.testing.assert_close(sparse.labelled_logits, full.logits[labels != -100])


@pytest.mark.parametrize("cls,overrides", HEADS)
def test_save_pretrained_loads_back_in_transformers(cls, overrides, tmp_path):
    hf_model = _hf_model(cls, **overrides)
    hf_model.save_pretrained(str(tmp_path / "hf"))
    ours = _load_ours(cls, tmp_path / "hf")
    ours.save_pretrained(str(tmp_path / "ours"))
    loaded, info = cls.from_pretrained(str(tmp_path / "ours"), output_loading_info=True,
                                       attn_implementation="sdpa")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.config.architectures == [cls.__name__]
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "vocab_size", "local_attention", "layer_types", "rope_parameters", "norm_eps",
                 "classifier_pooling", "pad_token_id", "num_labels"):
        assert getattr(loaded.config, name) == getattr(hf_model.config, name), name
    want = hf_model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k
    again = _load_ours(cls, tmp_path / "ours")
    assert again.config.to_dict() == ours.config.to_dict()


def _fresh_config(**overrides):
    kw = dict(model_type="modernbert", vocab_size=64, pad_token_id=0, hidden_size=32,
              num_hidden_layers=3,
              num_attention_heads=2, intermediate_size=40, max_position_embeddings=64,
              layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
              num_labels=3, extra=dict(local_attention=8))
    kw.update(overrides)
    return BertConfig(**kw)


@pytest.mark.parametrize("name", list(OURS.values()))
def test_models_built_in_fastbert_load_in_transformers(name, tmp_path):
    """A ModernBERT made in fastbert (BertConfig(model_type="modernbert")) is one transformers
    loads with nothing missing and computes the same function of."""
    torch.manual_seed(0)
    labels = 2 if name == "BertForQuestionAnswering" else 3
    ours = getattr(fastbert, name)(_fresh_config(num_labels=labels)).train()
    ours.save_pretrained(str(tmp_path))
    cls = next(c for c, n in OURS.items() if n == name)
    loaded, info = cls.from_pretrained(str(tmp_path), output_loading_info=True,
                                       attn_implementation="sdpa")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.config.layer_types == ["full_attention", "sliding_attention",
                                         "sliding_attention"]
    loaded.train()
    ids, mask = padded_batch()
    inputs = _inputs(cls, ids, mask)
    got, _ = _run(ours, inputs, mask.bool())
    plain, _ = _run(loaded, inputs, mask.bool())
    exact, _ = _run(copy.deepcopy(loaded).double(), inputs, mask.bool())
    for key in plain:
        assert_close_by_rule(got[key], plain[key], exact[key], key)


def test_pre_norm_layers_take_the_public_ops_not_the_lean_plan():
    """lean.py plans for BertLayers only: a ModernBERT forward gets no plan and runs its
    PreNormLayers on the public ops."""
    model = fastbert.BertModel(_fresh_config()).eval()
    ids, mask = padded_batch()
    packed = model._pack(ids, mask, None, None, None, None, True)
    assert lean.plan(model, packed.rows(ids), packed, None) is None
    assert lean.plan(model, ids, None, mask.bool()) is None
    with torch.no_grad():
        assert torch.isfinite(model(ids, mask).last_hidden_state).all()


def test_modernbert_config_refusals():
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        fastbert.BertModel(_fresh_config(extra=dict(rope_parameters={
            "full_attention": {"rope_type": "yarn", "rope_theta": 1e4}})))
    with pytest.raises(ValueError, match="is_decoder expected False"):
        fastbert.BertModel(_fresh_config(is_decoder=True))
    with pytest.raises(ValueError, match="classifier_pooling"):
        fastbert.BertForSequenceClassification(_fresh_config(extra=dict(
            classifier_pooling="max")))
    with pytest.raises(ValueError, match="position_embedding_type 'rotary'"):
        BertConfig(position_embedding_type="rotary")
    with pytest.raises(ValueError, match="fastbert serves no modernbert version"):
        fastbert.BertForPreTraining(_fresh_config())
    with pytest.raises(ValueError, match="head dim .* expected <= 256, got 260"):
        fastbert.BertModel(_fresh_config(hidden_size=520, num_attention_heads=2))
    with pytest.raises(ValueError, match="rope_scaling"):
        fastbert.BertModel(_fresh_config(extra=dict(rope_scaling={"rope_type": "linear"})))


def test_fresh_config_takes_modernbert_defaults():
    """BertConfig(model_type="modernbert") without the fields is ModernBERT-base as
    transformers' ModernBertConfig() has it, not BERT's defaults; given fields win."""
    ours, theirs = BertConfig(model_type="modernbert"), transformers.ModernBertConfig()
    for field, name in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                        ("num_hidden_layers", "num_hidden_layers"),
                        ("num_attention_heads", "num_attention_heads"),
                        ("intermediate_size", "intermediate_size"),
                        ("max_position_embeddings", "max_position_embeddings"),
                        ("layer_norm_eps", "norm_eps"), ("pad_token_id", "pad_token_id"),
                        ("hidden_dropout_prob", "mlp_dropout"),
                        ("attention_probs_dropout_prob", "attention_dropout"),
                        ("classifier_dropout", "classifier_dropout"),
                        ("initializer_range", "initializer_range")):
        assert getattr(ours, field) == getattr(theirs, name), field
    for name in ("initializer_cutoff_factor", "sparse_prediction", "sparse_pred_ignore_index",
                 "local_attention", "classifier_pooling", "norm_bias"):
        assert ours.setting(name, None) == getattr(theirs, name), name
    assert BertConfig(model_type="modernbert", layer_norm_eps=1e-6).layer_norm_eps == 1e-6
    assert BertConfig().vocab_size == 30522 and BertConfig().layer_norm_eps == 1e-12
    with pytest.raises(ValueError, match="pad_token_id expected < vocab_size"):
        BertConfig(model_type="modernbert", vocab_size=64)  # ModernBERT's padding id, 50283


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForSequenceClassification",
                                  "BertForQuestionAnswering"])
def test_initialisation_follows_transformers(name):
    """From scratch, every parameter has the distribution transformers' ModernBERT
    _init_weights gives it: the same std (truncated normal: std 0.02, projections into the
    residual stream 0.02 / sqrt(2 layers), classifiers hidden ** -0.5) and the same cutoff (2
    stds), LayerNorms one, biases zero; compared parameter by parameter, by checkpoint name."""
    cls = next(c for c, n in OURS.items() if n == name)
    labels = 2 if name == "BertForQuestionAnswering" else 3
    kw = dict(vocab_size=300, hidden_size=96, num_hidden_layers=8, num_attention_heads=4,
              intermediate_size=128, num_labels=labels, pad_token_id=0)
    torch.manual_seed(0)
    ours = getattr(fastbert, name)(BertConfig(model_type="modernbert", **kw))
    theirs = cls(transformers.ModernBertConfig(**kw, bos_token_id=1,
                                                eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                                mask_token_id=3))
    got = FAMILY.to_checkpoint(dict(ours.named_parameters()), bare=False)
    want = dict(theirs.named_parameters())
    assert want.keys() <= got.keys(), want.keys() - got.keys()
    for key, w in want.items():
        g = got[key].detach()
        if w.std() == 0:  # ones and zeros
            assert torch.equal(g, w.detach()), key
            continue
        # sample stds of >= 192 truncated normals agree within ~15 %; the cutoff to a few %
        assert abs(g.std() / w.std() - 1) < 0.15, (key, g.std().item(), w.std().item())
        assert abs(g.abs().max() / w.abs().max() - 1) < 0.1, key


def test_hub_style_config(tmp_path):
    """config.json as the Hub's ModernBERT folders were written (global/local_rope_theta and
    global_attn_every_n_layers, no layer_types or rope_parameters; BERT's layer_norm_eps and
    position_embedding_type beside): fastbert reads the same layer kinds and thetas as
    transformers."""
    import json
    hf_model = _hf_model(mb.ModernBertForMaskedLM)
    hf_model.save_pretrained(str(tmp_path))
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    for name in ("layer_types", "rope_parameters"):
        del config[name]
    config.update(global_rope_theta=5000.0, local_rope_theta=300.0, global_attn_every_n_layers=2,
                  layer_norm_eps=1e-5, position_embedding_type="absolute")
    path.write_text(json.dumps(config))
    hf_model = mb.ModernBertForMaskedLM.from_pretrained(str(tmp_path),
                                                        attn_implementation="sdpa").train()
    assert hf_model.config.layer_types == ["full_attention", "sliding_attention",
                                           "full_attention"]
    ours = _load_ours(mb.ModernBertForMaskedLM, tmp_path)
    assert [layer.rope_theta for layer in ours.bert.encoder.layer] == [5000.0, 300.0, 5000.0]
    ids, mask = padded_batch()
    _agree(ours, hf_model, _inputs(mb.ModernBertForMaskedLM, ids, mask), mask.bool())


def test_tokenizer_of_a_modernbert_folder_matches_transformers(tmp_path):
    """ModernBERT's tokenizer.json kind: byte-level BPE with BERT's [CLS]/[SEP] specials and a
    template post-processor. fastbert.data.Tokenizer gives transformers' ids, single and pair."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["The bank raised rates again.", "Rates went up, then down; café prices too!",
              "He scored twice in the second half.", "Numbers: 12345 and 3.14."] * 5
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", unk_token="[UNK]").save_pretrained(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = data.Tokenizer.from_pretrained(str(tmp_path))
    for a, b in [("The bank raised rates.", None), ("  café, 12345!", "Rates went up."),
                 ("unseen wörds ✓", "He scored twice")]:
        want = theirs(a, b)["input_ids"]
        assert ours.encode(a, b)["input_ids"] == want, (a, b)
    assert want[0] == cls and want[-1] == sep


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_encoder_takes_a_modernbert_embedding_folder(pooling, tmp_path):
    """A sentence-transformers folder around a ModernBERT (tokenizer.json with ModernBERT's
    [CLS]/[SEP]/[PAD] specials, its Pooling config): fastbert.SentenceEncoder gives
    sentence-transformers' embeddings."""
    st = pytest.importorskip("sentence_transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"] + [f"w{i}" for i in range(5, 64)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", unk_token="[UNK]")
    _hf_model(mb.ModernBertModel).save_pretrained(str(tmp_path / "hf"))
    tokenizer.save_pretrained(str(tmp_path / "hf"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sentence-transformers' renamed-module notices
        from sentence_transformers import models as st_models
        module = st_models.Transformer(str(tmp_path / "hf"))
        st.SentenceTransformer(modules=[module, st_models.Pooling(
            module.get_word_embedding_dimension(), pooling_mode=pooling)]).save(
                str(tmp_path / "st"))
        texts = ["w5 w6 w7", "w9 " * 30, "w10 w11 w63 w40 w41 w42 w43 w44 w45", "w8"]
        want = st.SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(
            texts, convert_to_tensor=True)
    encoder = fastbert.SentenceEncoder.from_pretrained(str(tmp_path / "st"))
    assert encoder.pooling == pooling
    torch.testing.assert_close(encoder.encode(texts, convert_to_tensor=True), want,
                               rtol=1e-5, atol=1e-5)


def test_checkpointing_and_wrapped_modules_compute_the_same():
    """Gradient checkpointing recomputes the pre-norm layers with their rotary tables; a hooked
    ffn_in / LayerNorm is called as a module (the fused GeGLU and norm serve plain ones only)."""
    torch.manual_seed(0)
    model = fastbert.BertForMaskedLM(_fresh_config()).train()
    ids, mask = padded_batch()
    inputs = _inputs(mb.ModernBertForMaskedLM, ids, mask)

    def loss_and_grads():
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    want, want_grads = loss_and_grads()
    model.gradient_checkpointing_enable()
    got, got_grads = loss_and_grads()
    model.gradient_checkpointing_disable()
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    calls = []
    layer = model.bert.encoder.layer[1]
    for module in (layer.ffn_in, layer.ffn_norm, layer.attn_norm):
        module.register_forward_hook(lambda *args: calls.append(1))
    got, got_grads = loss_and_grads()
    assert len(calls) == 3
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("unpad", [False, True])
def test_torch_compile_fullgraph_matches_eager(unpad):
    """As tests/test_model.py's for BERT, where the compiled model runs padded (windowed
    fastbert.attention); so it does with unpad and dynamo capturing the data-dependent token
    count, as the window is shorter than the rows (a mask's holes cannot be read while
    tracing, see BertModel._pack)."""
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=unpad):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = fastbert.BertForMaskedLM(_fresh_config()).eval()
        ids, mask = padded_batch()
        inputs = _inputs(mb.ModernBertForMaskedLM, ids, mask)
        eager = model(**inputs)
        eager.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs)
        got.loss.backward()
        torch.testing.assert_close(got.loss, eager.loss)
        torch.testing.assert_close(got.logits[mask.bool()], eager.logits[mask.bool()])
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[n], msg=n)


@pytest.mark.interpreter
@pytest.mark.parametrize("unpad", [True, False])
def test_model_on_triton_interpreter_matches_torch_backend(unpad):
    """The pre-norm layers on the Triton kernels (windowed attention, RoPE, GeGLU, bias-free
    LayerNorm) give the torch backend's loss, logits and gradients."""
    torch.manual_seed(0)
    model = fastbert.BertForMaskedLM(_fresh_config(unpad=unpad)).eval()
    ids, mask = padded_batch()
    inputs = _inputs(mb.ModernBertForMaskedLM, ids, mask)
    kernel = _run_on_backend(model, "triton", torch.float32, inputs)
    exact = _run_on_backend(model, "torch", torch.float32, inputs)
    real = mask.bool()
    torch.testing.assert_close(kernel[0], exact[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel[1][real], exact[1][real], rtol=1e-5, atol=1e-5)
    for name, g in kernel[2].items():
        torch.testing.assert_close(g, exact[2][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("unpad", [True, False])
def test_model_on_gpu_backends_by_tolerance_rule(unpad, dtype, backend):
    """The own ModernBERT MLM on each GPU backend (windowed attention, RoPE, GeGLU, pre-norm
    LayerNorm) against the torch backend in that dtype and in fp64."""
    reason = cuda_backend.unavailable_reason() if backend == "cuda" else None
    if reason is not None:
        pytest.skip(f"CUDA extension: {reason}")
    config = _fresh_config(vocab_size=512, hidden_size=256, num_attention_heads=4,
                           intermediate_size=384, max_position_embeddings=256, unpad=unpad,
                           extra=dict(local_attention=32))
    torch.manual_seed(0)
    model = fastbert.BertForMaskedLM(config).cuda().eval()
    ids = torch.randint(4, 512, (3, 130), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0
    mask[2, 9:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    kernel = _run_on_backend(model, backend, dtype, inputs)
    plain = _run_on_backend(model, "torch", dtype, inputs)
    exact = _run_on_backend(model, "torch", torch.float64, inputs)
    real = mask.bool()
    assert_close_by_rule(kernel[0], plain[0], exact[0], "loss", factor=3.0)
    assert_close_by_rule(kernel[1][real], plain[1][real], exact[1][real], "logits", factor=3.0)
    for name, g in kernel[2].items():
        assert torch.isfinite(g).all(), name
        assert_close_by_rule(g, plain[2][name], exact[2][name], f"grad {name}", factor=3.0,
                             floor=2e-2 * exact[2][name].abs().max().item())
