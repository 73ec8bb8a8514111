"""fastbert's own classes on RoBERTa, XLM-RoBERTa, ELECTRA and DistilBERT checkpoints: a transformers
model's checkpoint loads into the fastbert class with no missing or ignored weight and gives the
same outputs (real tokens), loss and every gradient by the tolerance rule; what fastbert saves
loads back into the transformers class with no missing or unexpected key and the same tensors."""
import copy
import warnings

import pytest
import torch

import fastbert
from fastbert.family import FAMILIES
from tests.helpers import FLOOR, assert_close_by_rule
from tests.test_family import ARCHS, make_inputs, make_model, randomize_by_type_
from tests.test_hf import grads_by_hf_name

transformers = pytest.importorskip("transformers")

# transformers' head suffix -> fastbert's class
OURS = {"Model": "BertModel", "ForSequenceClassification": "BertForSequenceClassification",
        "ForTokenClassification": "BertForTokenClassification",
        "ForQuestionAnswering": "BertForQuestionAnswering", "ForMaskedLM": "BertForMaskedLM",
        "ForCausalLM": "BertLMHeadModel"}
MODEL_TYPE = {"roberta": "roberta", "xlm_roberta": "xlm-roberta", "electra": "electra",
              "distilbert": "distilbert"}
CASES = [(arch, head) for arch in ARCHS for head in OURS
         if not (arch == "distilbert" and head == "ForCausalLM")]


def _hf_model(arch, head):
    if head == "Model" and FAMILIES[MODEL_TYPE[arch]].has_pooler:  # with its pooler, as saved
        prefix, config_cls, kwargs = ARCHS[arch]
        config = getattr(transformers, config_cls)(**kwargs, attn_implementation="eager")
        base = getattr(transformers, prefix + "Model")(config).eval()
        randomize_by_type_(base)
        return base
    extra = dict(is_decoder=True) if head == "ForCausalLM" else {}
    return make_model(arch, head, **extra)


def _inputs(model, head, padded=True):
    # span-QA losses normalise over every position, padding included in transformers: compare
    # them on unpadded batches (as tests/test_hf.py does)
    inputs = make_inputs(model, head, padded=padded and head != "ForQuestionAnswering")
    if head == "ForCausalLM":
        inputs["labels"] = torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], -100)
    return inputs


def _run(model, inputs, head, family=None):
    """(outputs at real tokens by name, gradients by the checkpoint's parameter names)."""
    model.zero_grad()
    out = model(**inputs)
    real = inputs["attention_mask"].bool()
    if head == "Model":  # a fixed random projection of the hidden states at real tokens
        h = out.last_hidden_state
        weights = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(h.dtype)
        loss = (h * weights * real.unsqueeze(-1)).sum()
        fields = {"last_hidden_state": h[real]}
        if getattr(out, "pooler_output", None) is not None:
            loss = loss + out.pooler_output.sum()
            fields["pooler_output"] = out.pooler_output
    else:
        loss = out.loss
        fields = {"loss": loss}
        for name in ("logits", "start_logits", "end_logits"):
            t = getattr(out, name, None)
            if t is not None:
                fields[name] = t[real] if t.shape[:2] == real.shape else t
    loss.backward()
    if family is None:
        grads = {n: p.grad for n, p in model.named_parameters()}
    else:
        bare = not hasattr(model, model.base_model_prefix)
        grads = family.to_checkpoint(grads_by_hf_name(model), bare=bare)
    return {k: v.detach() for k, v in fields.items()}, grads


def _load_ours(arch, head, path, **overrides):
    with warnings.catch_warnings(record=True) as record:  # nothing missing, nothing ignored
        warnings.simplefilter("always")
        ours = getattr(fastbert, OURS[head]).from_pretrained(str(path), **overrides)
    assert not [w for w in record if "from_pretrained" in str(w.message)], \
        [str(w.message) for w in record]
    assert ours.config.model_type == MODEL_TYPE[arch]
    return ours


@pytest.mark.parametrize("arch,head", CASES)
def test_checkpoint_loads_and_matches_transformers(arch, head, tmp_path):
    hf_model = _hf_model(arch, head)
    hf_model.save_pretrained(str(tmp_path))
    ours = _load_ours(arch, head, tmp_path).eval()
    family = FAMILIES[MODEL_TYPE[arch]]
    inputs = _inputs(hf_model, head)
    got, got_grads = _run(ours, inputs, head, family)
    plain, plain_grads = _run(hf_model, inputs, head)
    exact, exact_grads = _run(copy.deepcopy(hf_model).double(), inputs, head)
    assert set(got) == set(plain), (set(got), set(plain))
    for name in plain:
        assert_close_by_rule(got[name], plain[name], exact[name], name=f"{arch} {head} {name}")
    assert plain_grads.keys() <= got_grads.keys(), plain_grads.keys() - got_grads.keys()
    for name, g in plain_grads.items():
        # a parameter's gradient sums over every token: its floor scales with its magnitude, as
        # the op tests' dweight (DESIGN.md: fp32 agrees to ~1e-5 relative). fastbert's CPU
        # kernels round independently of transformers' ATen ops, whose errors the plain run
        # shares at every LayerNorm: the max-error ratio of two independent fp32 runs reached
        # 3x on one (32,) LayerNorm weight in 30 draws (1.05e-4 of 33.8, 3e-6 relative), while
        # the kernels' geometric-mean ratio over every gradient was 0.99 (ATen's path 1.03)
        floor = FLOOR[g.dtype] * max(1.0, exact_grads[name].abs().max().item())
        assert_close_by_rule(got_grads[name], g, exact_grads[name], name=f"{arch} {head} d{name}",
                             floor=floor)


@pytest.mark.parametrize("arch,head", CASES)
def test_save_pretrained_loads_back_in_transformers(arch, head, tmp_path):
    hf_model = _hf_model(arch, head)
    hf_model.save_pretrained(str(tmp_path / "hf"))
    ours = _load_ours(arch, head, tmp_path / "hf")
    ours.save_pretrained(str(tmp_path / "ours"))
    prefix = ARCHS[arch][0]
    cls = getattr(transformers, prefix + head)
    loaded, info = cls.from_pretrained(str(tmp_path / "ours"), output_loading_info=True,
                                       attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.config.model_type == hf_model.config.model_type
    assert loaded.config.architectures == [prefix + head]
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                 "max_position_embeddings", "pad_token_id"):
        assert getattr(loaded.config, name) == getattr(hf_model.config, name), name
    want = hf_model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k
    again = _load_ours(arch, head, tmp_path / "ours")
    assert again.config.to_dict() == ours.config.to_dict()


@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("arch", ["roberta", "distilbert"])
def test_left_padding_and_the_padded_path(arch, unpad, tmp_path):
    """RoBERTa counts positions over real tokens from pad_token_id + 1, as transformers derives
    them from input_ids: a left-padded batch gives each row's tokens the same positions."""
    hf_model = _hf_model(arch, "Model")
    hf_model.save_pretrained(str(tmp_path))
    ours = _load_ours(arch, "Model", tmp_path, unpad=unpad).eval()
    inputs = _inputs(hf_model, "Model")
    left = {k: v.flip(1) for k, v in inputs.items()}  # right padding -> left padding
    real = left["attention_mask"].bool()
    with torch.no_grad():
        got = ours(**left).last_hidden_state[real]
        plain = hf_model(**left).last_hidden_state[real]
        exact = copy.deepcopy(hf_model).double()(**left).last_hidden_state[real]
    assert_close_by_rule(got, plain, exact, name=f"{arch} left-padded unpad={unpad}")


def test_family_configs_and_refusals():
    with pytest.raises(ValueError, match="model_type expected one of"):
        fastbert.BertConfig(model_type="gpt2")
    with pytest.raises(ValueError, match="roberta.*BertForMaskedLM"):
        fastbert.BertForPreTraining(fastbert.BertConfig(model_type="roberta", type_vocab_size=1))
    with pytest.raises(ValueError, match="distilbert"):
        fastbert.BertLMHeadModel(fastbert.BertConfig(model_type="distilbert"))
    distil = fastbert.BertConfig.from_dict(dict(model_type="distilbert", dim=32, n_layers=1,
                                                n_heads=2, hidden_dim=64, activation="gelu"))
    assert (distil.hidden_size, distil.num_hidden_layers, distil.intermediate_size,
            distil.type_vocab_size) == (32, 1, 64, 0)
    written = distil.to_dict()
    assert written["dim"] == 32 and "hidden_size" not in written and "type_vocab_size" not in written
    roberta = fastbert.BertConfig(model_type="roberta", pad_token_id=1)
    assert roberta.position_offset == 2 and fastbert.BertConfig().position_offset == 0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_models_built_in_fastbert_load_in_transformers(arch, tmp_path):
    """A family model made from a fastbert config (not read from transformers) saves a config
    transformers reads the same way: ELECTRA's embedding_size, DistilBERT's dropouts."""
    prefix, _, kwargs = ARCHS[arch]
    config = fastbert.BertConfig.from_dict(dict(kwargs, model_type=MODEL_TYPE[arch]))
    ours = fastbert.BertForSequenceClassification(config)
    ours.save_pretrained(str(tmp_path))
    loaded, info = getattr(transformers, prefix + "ForSequenceClassification").from_pretrained(
        str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if arch == "distilbert":
        assert loaded.config.seq_classif_dropout == ours.classifier.dropout.p == 0.2
    if arch == "electra":
        assert loaded.config.embedding_size == ours.config.embedding_dim


def test_family_config_overrides_and_refusals(tmp_path):
    with pytest.raises(ValueError, match="only ELECTRA projects"):
        fastbert.BertConfig(model_type="roberta", embedding_size=32, pad_token_id=1)
    with pytest.raises(ValueError, match="pad_token_id expected an int"):
        fastbert.BertConfig(model_type="roberta", pad_token_id=None)
    _hf_model("distilbert", "ForSequenceClassification").save_pretrained(str(tmp_path))
    model = fastbert.BertForSequenceClassification.from_pretrained(
        str(tmp_path), seq_classif_dropout=0.05)  # the family's own field name
    assert model.classifier.dropout.p == 0.05


def test_roberta_packed_input_with_its_own_positions(tmp_path):
    """Packed RoBERTa input (1, T): sequences restart at the first token's position, whether the
    positions are RoBERTa's own (pad_token_id + 1, ...) or a collator's 0-based ones."""
    hf_model = _hf_model("roberta", "Model")
    hf_model.save_pretrained(str(tmp_path))
    ours = _load_ours("roberta", "Model", tmp_path).eval()
    pad = ours.config.pad_token_id
    a, b = torch.tensor([[0, 5, 6, 2]]), torch.tensor([[0, 7, 8, 9, 2]])
    with torch.no_grad():
        separate = torch.cat([ours(a).last_hidden_state[0], ours(b).last_hidden_state[0]])
        for start in (pad + 1, 0):
            pos = torch.cat([torch.arange(4), torch.arange(5)])[None] + start
            packed = ours(torch.cat([a, b], 1), position_ids=pos).last_hidden_state[0]
            if start == pad + 1:  # the same positions as unpacked: the same outputs
                torch.testing.assert_close(packed, separate)
            else:  # other positions, still two sequences: the first equals itself run alone
                alone = ours(a, position_ids=pos[:, :4]).last_hidden_state[0]
                torch.testing.assert_close(packed[:4], alone)
    assert ours.embeddings.position_embeddings.padding_idx == pad  # as transformers has it


def test_bert_multiple_choice_matches_transformers(tmp_path):
    """BertForMultipleChoice (BERT's: pooler -> dropout -> classifier, one logit per choice):
    a transformers checkpoint loads with nothing missing or ignored, gives the same logits, loss
    and every gradient by the tolerance rule, padded choices included, and what fastbert saves
    loads back into transformers with nothing missing or unexpected."""
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    hf_model = transformers.BertForMultipleChoice(config).train()
    randomize_by_type_(hf_model)
    hf_model.save_pretrained(str(tmp_path / "hf"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours = fastbert.BertForMultipleChoice.from_pretrained(str(tmp_path / "hf")).train()
    assert not [w for w in record if "from_pretrained" in str(w.message)]
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 64, (2, 3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 1, 6:] = 0
    mask[1, 2, 3:] = 0
    inputs = dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask,
                  labels=torch.tensor([2, 0]))
    results = []
    for model in (ours, hf_model, copy.deepcopy(hf_model).double()):
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        grads = grads_by_hf_name(model)
        if model is ours:
            grads = FAMILIES["bert"].to_checkpoint(grads, bare=False)
        results.append((out.loss.detach(), out.logits.detach(), grads))
    (loss, logits, grads), (p_loss, p_logits, p_grads), (e_loss, e_logits, e_grads) = results
    assert logits.shape == (2, 3)
    assert_close_by_rule(loss, p_loss, e_loss, "loss")
    assert_close_by_rule(logits, p_logits, e_logits, "logits")
    for name, grad in p_grads.items():
        assert_close_by_rule(grads[name], grad, e_grads[name], f"d{name}")
    ours.save_pretrained(str(tmp_path / "ours"))
    loaded, info = transformers.BertForMultipleChoice.from_pretrained(
        str(tmp_path / "ours"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, hf_model.state_dict()[key]), key
