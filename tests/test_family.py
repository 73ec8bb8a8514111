"""patch_hf on the BERT family: RoBERTa, XLM-RoBERTa, ELECTRA and DistilBERT, base models and task
heads, against the unpatched transformers model on tiny random configs: outputs at real tokens,
losses and every parameter gradient by the tolerance rule (fp32 patched vs fp32 transformers, both
against transformers in fp64), padded batches on the unpadded path, optimizer steps, fastbert's ops
called, and refusals that leave the model untouched."""
import copy

import pytest
import torch
import torch.nn as nn

import fastbert
from tests.helpers import assert_close_by_rule, random_padding_mask
from tests.test_hf import assert_agree, count_fused_ops

transformers = pytest.importorskip("transformers")

B, S = 3, 11
ARCHS = {  # name -> (class prefix, config class, config kwargs)
    "roberta": ("Roberta", "RobertaConfig",
                dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=40, type_vocab_size=1,
                     pad_token_id=1)),
    "xlm_roberta": ("XLMRoberta", "XLMRobertaConfig",
                    dict(vocab_size=90, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                         intermediate_size=96, max_position_embeddings=40, type_vocab_size=1,
                         pad_token_id=1, hidden_act="gelu_new", layer_norm_eps=1e-5)),
    "electra": ("Electra", "ElectraConfig",  # embedding_size != hidden_size: embeddings_project
                dict(vocab_size=100, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=32,
                     type_vocab_size=2, pad_token_id=0)),
    "distilbert": ("DistilBert", "DistilBertConfig",
                   dict(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                        max_position_embeddings=32, pad_token_id=0)),
}
HEADS = ["Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
         "ForMaskedLM"]
NO_DROPOUT = {"roberta": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
              "distilbert": dict(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)}
NO_DROPOUT["xlm_roberta"] = NO_DROPOUT["electra"] = NO_DROPOUT["roberta"]


def make_model(arch: str, head: str, attn_implementation: str = "eager", **overrides):
    prefix, config_cls, kwargs = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**kwargs, "num_labels": 3, **overrides},
                                               attn_implementation=attn_implementation)
    if head == "ForQuestionAnswering":
        config.num_labels = 2
    no_pooler = dict(add_pooling_layer=False) if head == "Model" and "Roberta" in prefix else {}
    model = getattr(transformers, prefix + head)(config, **no_pooler).eval()
    randomize_by_type_(model)
    return model


def randomize_by_type_(model):
    """Order-one weights, as tests.test_hf.randomize_ makes them, chosen by module type (DistilBERT
    names its LayerNorms sa_layer_norm/output_layer_norm, which the name-based version misses)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(0.5 * torch.randn_like(module.weight))
            elif isinstance(module, nn.Linear):  # pre-activations of std ~1.5
                module.weight.copy_(1.5 * torch.randn_like(module.weight)
                                    / module.weight.shape[1] ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.2 * torch.randn_like(module.bias))


def make_inputs(model, head: str, padded: bool = True):
    """A right-padded batch (pad token ids at padding, as a tokenizer gives: RoBERTa's position ids
    come from them) and the labels each head takes, -100 at padding."""
    config = model.config
    mask = random_padding_mask(B, S, mode="third" if padded else "full").long()
    real = torch.randint(0, config.vocab_size, (B, S))
    real = torch.where(real == config.pad_token_id, (real + 1) % config.vocab_size, real)
    ids = torch.where(mask.bool(), real, config.pad_token_id)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if getattr(config, "type_vocab_size", 0) > 1:
        inputs["token_type_ids"] = torch.randint(0, config.type_vocab_size, (B, S)) * mask
    if head == "ForSequenceClassification":
        inputs["labels"] = torch.randint(0, config.num_labels, (B,))
    elif head in ("ForTokenClassification", "ForMaskedLM"):
        labels = torch.randint(0, config.num_labels if head == "ForTokenClassification"
                               else config.vocab_size, (B, S))
        labels = torch.where((torch.rand(B, S) < 0.6) & mask.bool(), labels, -100)
        labels[:, 0] = ids[:, 0] % (config.num_labels if head == "ForTokenClassification"
                                    else config.vocab_size)  # at least one label per row
        inputs["labels"] = labels
    elif head == "ForQuestionAnswering":
        inputs.update(start_positions=torch.tensor([1, S + 5, 3]),  # S + 5 is out of range
                      end_positions=torch.tensor([4, 2, 100]))
    return inputs


class LastHidden(nn.Module):
    """A base model (without pooler) seen as a head: the loss is a fixed random projection of the
    hidden states at real tokens, as tests.test_hf.run does for BertModel. The hidden states
    (logits) and every gradient are compared; the projection is not, as test_hf.run does not
    compare BertModel's: a sum of ~1,000 values, whose fp32 error one draw may cancel. Over 192
    random draws of test_patched_matches_transformers_unpadded[{bert,roberta,electra}-Model] the
    rule failed on it 14 times with ATen's attention and 19 with fastbert's CPU kernel (and on
    one gradient, ELECTRA's embedding LayerNorm weight, once with the kernel)."""
    loss_is_projection = True

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, attention_mask, **inputs):
        out = self.base(attention_mask=attention_mask, **inputs)
        h = out.last_hidden_state
        weights = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(h.dtype)
        loss = (h * weights * attention_mask.unsqueeze(-1)).sum()
        return transformers.modeling_outputs.TokenClassifierOutput(loss=loss, logits=h)


def wrap(model, head):
    return LastHidden(model) if head == "Model" else model


def patched_copy(model, monkeypatch, unpad=True):
    """patch_hf on a deep copy (same Parameter objects kept), with fastbert's ops counted."""
    patched = copy.deepcopy(model)
    params = dict(patched.named_parameters())
    assert fastbert.patch_hf(patched, unpad=unpad) is patched
    assert all(params[n] is p for n, p in patched.named_parameters())
    return patched, count_fused_ops(monkeypatch)


def check_calls(calls, layers, packed, gelu=True):
    assert calls["attention_varlen" if packed else "attention"] == layers, calls
    assert calls["attention" if packed else "attention_varlen"] == 0, calls
    assert calls["linear_bias_gelu"] == (layers if gelu else 0), calls
    assert calls["add_layer_norm"] >= 2 * layers + 1, calls  # per layer two, plus the embeddings


# --------------------------------------------------------------------------------------------
# every architecture and head vs transformers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_patched_matches_transformers_unpadded(arch, head, monkeypatch):
    hf_model = make_model(arch, head)
    patched, calls = patched_copy(hf_model, monkeypatch)
    # transformers' span loss normalises over padding positions too (see tests/test_hf.py): the
    # QA loss and its gradients agree on batches without padding, which then run padded
    padded = head != "ForQuestionAnswering"
    inputs = make_inputs(hf_model, head, padded=padded)
    assert_agree(wrap(patched, head), wrap(hf_model, head), inputs, f"{arch} {head}")
    check_calls(calls, hf_model.config.num_hidden_layers, packed=padded)


def test_other_heads_on_the_same_encoder(monkeypatch):
    # ELECTRA's replaced-token discriminator and a multiple-choice head (a 3-D batch)
    hf_model = make_model("electra", "ForPreTraining")
    patched, calls = patched_copy(hf_model, monkeypatch)
    inputs = make_inputs(hf_model, "Model")
    inputs["labels"] = torch.randint(0, 2, (B, S))
    assert_agree(patched, hf_model, inputs, "electra ForPreTraining")
    check_calls(calls, 2, packed=True)
    hf_model = make_model("roberta", "ForMultipleChoice")
    patched = fastbert.patch_hf(copy.deepcopy(hf_model))
    choices = [make_inputs(hf_model, "Model") for _ in range(2)]
    inputs = {k: torch.stack([c[k] for c in choices], 1) for k in choices[0]}  # (B, 2, S)
    inputs["labels"] = torch.randint(0, 2, (B,))
    assert_agree(patched, hf_model, inputs, "roberta ForMultipleChoice")


def test_roberta_causal_lm_generates_as_unpatched():
    hf_model = make_model("roberta", "ForCausalLM", is_decoder=True)
    prompt = torch.randint(2, 100, (2, 4))  # no padding token (1)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
              pad_token_id=1, use_cache=True)
    expected = hf_model.generate(prompt, **kw)
    torch.testing.assert_close(fastbert.patch_hf(hf_model).generate(prompt, **kw), expected)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_profiler_sees_fastbert_ops_forward_and_backward(arch):
    head = "ForMaskedLM"
    model = fastbert.patch_hf(make_model(arch, head).train())
    inputs = make_inputs(model, head)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(**inputs).loss.backward()
    seen = {e.name for e in prof.events() if e.name.startswith("fastbert::")}
    expected = {f"fastbert::{op}_{way}" for op in ("attention_varlen", "add_layer_norm",
                                                  "linear_bias_gelu") for way in ("fwd", "bwd")}
    assert expected <= seen, seen
    assert "fastbert::attention_fwd" not in seen  # a padded batch: every layer ran packed


@pytest.mark.parametrize("arch", list(ARCHS))
def test_patched_padded_path_matches_transformers(arch, monkeypatch):
    head = "ForTokenClassification"
    hf_model = make_model(arch, head)
    patched, calls = patched_copy(hf_model, monkeypatch, unpad=False)
    assert_agree(patched, hf_model, make_inputs(hf_model, head), f"{arch} {head} padded")
    check_calls(calls, hf_model.config.num_hidden_layers, packed=False)


@pytest.mark.parametrize("arch", ["roberta", "distilbert"])
def test_sdpa_masks_and_hidden_states(arch):
    # sdpa hands the layers boolean masks (or None); per-layer outputs run the padded loop
    hf_model = make_model(arch, "Model", attn_implementation="sdpa")
    patched = fastbert.patch_hf(copy.deepcopy(hf_model))
    inputs = make_inputs(hf_model, "Model")
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        for kw in (dict(inputs), dict(input_ids=inputs["input_ids"]),
                   dict(inputs, output_hidden_states=True)):
            got, plain = patched(**kw), hf_model(**kw)
            exact = copy.deepcopy(hf_model).double()(**kw)
            pick = real if "attention_mask" in kw else slice(None)
            assert_close_by_rule(got.last_hidden_state[pick], plain.last_hidden_state[pick],
                                 exact.last_hidden_state[pick], name=f"{arch} sdpa {list(kw)}")
            if kw.get("output_hidden_states"):
                assert len(got.hidden_states) == len(plain.hidden_states) == 3


def test_distilbert_relu_keeps_its_activation(monkeypatch):
    head = "ForSequenceClassification"
    hf_model = make_model("distilbert", head, activation="relu")
    patched, calls = patched_copy(hf_model, monkeypatch)
    assert_agree(patched, hf_model, make_inputs(hf_model, head), f"distilbert relu {head}")
    check_calls(calls, 2, packed=True, gelu=False)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_optimizer_steps_give_the_unpatched_losses(arch):
    head = "ForSequenceClassification"
    plain = make_model(arch, head, **NO_DROPOUT[arch]).train()
    models = {"patched": copy.deepcopy(plain), "plain": plain,
              "exact": copy.deepcopy(plain).double()}
    inputs = make_inputs(plain, head)
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
                  for k, m in models.items()}  # made before patching
    fastbert.patch_hf(models["patched"])
    losses = {k: [] for k in models}
    for _ in range(4):
        for k, model in models.items():
            optimizers[k].zero_grad()
            loss = model(**inputs).loss
            loss.backward()
            optimizers[k].step()
            losses[k].append(loss.detach())
    for step in range(4):
        assert_close_by_rule(losses["patched"][step], losses["plain"][step],
                             losses["exact"][step], name=f"{arch} loss at step {step}")
    assert losses["patched"][-1] < losses["patched"][0], losses["patched"]


@pytest.mark.parametrize("arch", ["roberta", "distilbert"])
def test_gradient_checkpointing_recomputes_the_packed_layers(arch, monkeypatch):
    head = "ForTokenClassification"
    hf_model = make_model(arch, head, **NO_DROPOUT[arch]).train()
    hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched, calls = patched_copy(hf_model, monkeypatch)
    assert_agree(patched, hf_model, make_inputs(hf_model, head), f"{arch} checkpointed")
    assert calls["attention_varlen"] == 2 * hf_model.config.num_hidden_layers  # fwd + recompute


def test_patch_twice_is_once():
    model = make_model("electra", "ForMaskedLM")
    fastbert.patch_hf(fastbert.patch_hf(model))
    kinds = sorted({type(m).__name__ for m in model.modules()
                    if type(m).__name__.startswith("Fastbert")})
    assert kinds == ["FastbertElectraEncoder", "FastbertElectraIntermediate",
                     "FastbertElectraOutput", "FastbertElectraSelfAttention",
                     "FastbertElectraSelfOutput", "FastbertLayerNorm"]
    assert type(model.electra.embeddings_project) is nn.Linear  # a plain Linear, left alone


def test_distilbert_compiles_fullgraph():
    # DistilBERT's Transformer takes (hidden_states, attention_mask, **kwargs): the encoder patch's
    # padded fallback (taken under torch.compile) must pass them through as they came
    model = fastbert.patch_hf(make_model("distilbert", "ForMaskedLM"))
    inputs = make_inputs(model, "ForMaskedLM")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**inputs).loss, model(**inputs).loss)


# --------------------------------------------------------------------------------------------
# refusals: nothing patched
# --------------------------------------------------------------------------------------------

def kinds_of(model):
    return [type(m) for m in model.modules()]


def test_refuses_a_model_with_no_family_encoder():
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2,
                                                           vocab_size=10, n_positions=8))
    before = kinds_of(model)
    with pytest.raises(TypeError, match="GPT2Model contains no encoder fastbert serves"):
        fastbert.patch_hf(model)
    assert kinds_of(model) == before


def test_refuses_a_head_dim_over_the_limit():
    model = make_model("roberta", "ForSequenceClassification", hidden_size=520,
                       num_attention_heads=2, intermediate_size=16, num_hidden_layers=1)
    before = kinds_of(model)
    with pytest.raises(ValueError, match=r"roberta\.encoder\.layer\.0\.attention\.self "
                                         r"\(RobertaSelfAttention\): head dim 260 is over"):
        fastbert.patch_hf(model)
    assert kinds_of(model) == before


def test_refuses_flex_attention_masks():
    model = make_model("distilbert", "Model")
    model.config._attn_implementation = "flex_attention"
    before = kinds_of(model)
    with pytest.raises(ValueError, match=r"transformer \(Transformer\): "
                                         r"attn_implementation='flex_attention'"):
        fastbert.patch_hf(model)
    assert kinds_of(model) == before


@pytest.mark.parametrize("family", ["bert", "electra", "roberta", "distilbert"])
def test_refuses_the_layers_of_transformers_4(family, monkeypatch):
    """transformers 4.x layers (attention with head_mask, no **kwargs) are refused before
    anything is patched, with the version to install (checked by hand on transformers 4.57.6:
    a patched 4.57 BERT raised TypeError in its first masked forward before this)."""
    from fastbert import hf_patch

    monkeypatch.setattr(hf_patch, "_new_attention_api", lambda family: False)
    model = (transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)) if family == "bert" else make_model(family, "Model"))
    before = kinds_of(model)
    with pytest.raises(ValueError, match=r"pre-5\.0 interface \(patch_hf needs transformers "
                                         r">= 5\.0: pip install -U transformers\)"):
        fastbert.patch_hf(model)
    assert kinds_of(model) == before

